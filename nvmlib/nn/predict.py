"""Predictions of torch modules: batches of a loader, a model loaded with a flat parameter vector
(BatchNorm statistics recomputed), softmax probabilities, and the one Bayesian model average that
SWAG, MultiSWAG, the paper's evaluation and a dask cluster's workers all compute with."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as _update_bn

from nvmlib.errors import ConfigError, InputError
from nvmlib.nn.staging import unflatten_into

Loader = Iterable[Any] | torch.Tensor  # a DataLoader yielding (x, y) or x, or a tensor of inputs
TENSOR_BATCH = 512  # rows of a tensor "loader" per forward pass


def batches(
    loader: Loader, device: torch.device, name: str = "the loader"
) -> Iterator[torch.Tensor]:
    """The inputs of each batch of `loader`, on `device`; an InputError naming it (`name`) when a
    pass over it yields no batch, the first or a later one."""
    if isinstance(loader, torch.Tensor):  # views, no copy
        loader = [loader[i : i + TENSOR_BATCH] for i in range(0, len(loader), TENSOR_BATCH)]
    empty = True
    for item in loader:
        x = item[0] if isinstance(item, (list, tuple)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name} yielded a {type(x).__name__}, not a tensor: pass a DataLoader "
                "yielding (x, y) or x, or a tensor of inputs"
            )
        empty = False
        yield x.to(device)
    if empty:
        raise InputError(
            f"{name} yielded no batches: pass a non-empty DataLoader, list or tensor of inputs "
            "that yields its batches each time it is iterated (once per model)"
        )


def check_reiterable(loader: Loader, name: str) -> None:
    """Refuse a one-shot iterator (a generator, iter(loader)) where each drawn model reads `loader`
    again."""
    if isinstance(loader, Iterator):
        raise InputError(
            f"{name} is a one-shot iterator ({type(loader).__name__}): it is read once per model, "
            "so every model after the first would see nothing; pass a DataLoader or a "
            "list/tensor, which can be iterated once per model"
        )


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers (whose running statistics depend on the weights)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _forward_error(x: torch.Tensor, exc: RuntimeError) -> ValueError:
    return ValueError(
        f"the model cannot take a batch of shape {tuple(x.shape)} ({x.dtype}) from the loader: "
        f"{str(exc).splitlines()[0]}; pass a loader yielding inputs shaped as in training"
    )


def check_bn(model: nn.Module, bn_loader: Loader | None, update_bn: bool) -> None:
    """Refuse to draw models with BatchNorm and no data to recompute its statistics on, or data
    that can be read only once."""
    if not (update_bn and has_batchnorm(model)):
        return
    if bn_loader is None:
        raise ConfigError(
            "the model has BatchNorm layers, whose statistics belong to other weights: pass "
            "bn_loader=<training data> to recompute them for each sampled model, or "
            "update_bn=False to keep the stale statistics knowingly"
        )
    check_reiterable(bn_loader, "bn_loader")


def load(
    model: nn.Module, theta: np.ndarray, bn_loader: Loader | None, update_bn: bool = True
) -> nn.Module:
    """`model` with parameters `theta` (each in its own dtype), in eval mode, its BatchNorm
    statistics recomputed on bn_loader (torch.optim.swa_utils.update_bn) when it has BatchNorm and
    update_bn is set."""
    unflatten_into(theta, model.parameters())
    if update_bn and has_batchnorm(model):
        check_bn(model, bn_loader, update_bn)
        last: list[torch.Tensor] = []

        def inputs() -> Iterator[torch.Tensor]:
            for x in batches(bn_loader, next(model.parameters()).device, "bn_loader"):
                last[:] = [x]
                yield x

        try:
            with torch.no_grad():
                _update_bn(inputs(), model)
        except RuntimeError as exc:
            if last:
                raise _forward_error(last[0], exc) from exc
            raise
    model.eval()
    return model


def gather(loader: Loader, name: str = "the loader") -> torch.Tensor:
    """Every input of `loader` as one CPU tensor (to send to a cluster's workers once)."""
    return torch.cat(list(batches(loader, torch.device("cpu"), name)))


@torch.no_grad()
def probabilities(model: nn.Module, loader: Loader) -> np.ndarray:
    """Softmax probabilities (N, classes) float64 of `model` on every input of `loader`."""
    device = next(model.parameters()).device
    out = []
    for x in batches(loader, device):
        try:
            logits = model(x)
        except RuntimeError as exc:
            raise _forward_error(x, exc) from exc
        out.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(out).numpy()


def bma_sums(
    model: nn.Module,
    thetas: Iterable[np.ndarray],
    inputs: dict[str, Loader],
    bn_loader: Loader | None = None,
    update_bn: bool = True,
) -> tuple[dict[str, np.ndarray], int]:
    """Σ over `thetas` of each named input's probabilities (N, classes) float64, and how many
    thetas: `model` takes each θ in turn (load: BatchNorm refreshed on bn_loader when update_bn)."""
    sums: dict[str, np.ndarray] = {}
    count = 0
    for theta in thetas:
        load(model, theta, bn_loader, update_bn)
        for name, x in inputs.items():
            p = probabilities(model, x)
            if name in sums:
                sums[name] += p
            else:
                sums[name] = p
        count += 1
    return sums, count


def bma(
    model: nn.Module,
    thetas: Iterable[np.ndarray],
    inputs: dict[str, Loader],
    bn_loader: Loader | None = None,
    update_bn: bool = True,
) -> dict[str, np.ndarray]:
    """The Bayesian model average: each named input's probabilities averaged over `thetas`
    (`model` ends with the last θ loaded; pass a copy to keep it)."""
    sums, count = bma_sums(model, thetas, inputs, bn_loader, update_bn)
    if count == 0:
        raise InputError("no parameter vectors to average over: draw at least one (S >= 1)")
    return {name: s / count for name, s in sums.items()}
