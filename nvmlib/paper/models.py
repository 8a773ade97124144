"""The four MNIST classifiers of the paper, and the flat parameter vector SWAG records."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from nvmlib.errors import ConfigError
from nvmlib.nn.staging import unflatten_into


def model_2conv2fc() -> nn.Module:
    """Two 5x5 convolutions and two linear layers: 21,840 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 10, kernel_size=5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(10, 20, kernel_size=5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(320, 50),
        nn.ReLU(),
        nn.Linear(50, 10),
    )


def _mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def model_2fc() -> nn.Module:
    """784-1000-10 MLP: 795,010 parameters."""
    return _mlp(784, 1000, 10)


def model_3fc() -> nn.Module:
    """784-1000-500-10 MLP: 1,290,510 parameters."""
    return _mlp(784, 1000, 500, 10)


def model_4fc() -> nn.Module:
    """784-1000-1000-1000-10 MLP: 2,797,010 parameters."""
    return _mlp(784, 1000, 1000, 1000, 10)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "model_2conv2fc": model_2conv2fc,
    "model_2fc": model_2fc,
    "model_3fc": model_3fc,
    "model_4fc": model_4fc,
}


def make_model(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model by name; with `seed`, its initial weights depend only on the seed."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if seed is None:
        return MODELS[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def n_params(model: nn.Module) -> int:
    """Number of trainable parameters (the length of the flat vector)."""
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module) -> torch.Tensor:
    """The parameters as one 1-D tensor (a copy, on the model's device)."""
    return nn.utils.parameters_to_vector(model.parameters()).detach()


def set_flat(model: nn.Module, theta: np.ndarray | torch.Tensor) -> None:
    """Load a flat parameter vector (numpy or torch, any device) into the model in place, each
    parameter in its own dtype."""
    unflatten_into(theta, model.parameters())
