"""Bayesian model averaging over SWAG samples versus the SGD point estimate and the SWA mean.

Metrics on MNIST test, on rotated MNIST, and OOD detection of Fashion-MNIST by predictive
entropy. All predictions are probabilities averaged over parameter vectors (BMA).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from nvmlib.errors import InputError
from nvmlib.nn.predict import bma
from nvmlib.paper.data import MNIST_MEAN, MNIST_STD, Split
from nvmlib.paper.models import get_flat
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.sampling import check_sampling

ANGLES = tuple(range(0, 181, 15))
METHODS = ("SGD", "SWA", "SWAG")


# ---- metrics ----------------------------------------------------------------------------------
def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == labels))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def reliability_table(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per non-empty equal-width confidence bin: mean confidence, accuracy and count."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "confidence": conf, "accuracy": correct})
    return (
        frame.groupby("bin")
        .agg(
            confidence=("confidence", "mean"),
            accuracy=("accuracy", "mean"),
            count=("accuracy", "size"),
        )
        .reset_index()
    )


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over the bins of reliability_table."""
    table = reliability_table(probs, labels, bins)
    gaps = (table.accuracy - table.confidence).abs() * table["count"]
    return float(gaps.sum() / len(labels))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of the squared distance between probabilities and the one-hot label."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy of each row (nats)."""
    return -np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=1)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an out-of-distribution score exceeds an in-distribution one (ties count
    1/2)."""
    ranks = pd.Series(np.concatenate([in_scores, out_scores])).rank().to_numpy()
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


# ---- the evaluation ---------------------------------------------------------------------------
def rotate(split: Split, angle: float) -> torch.Tensor:
    """The split's images rotated by `angle` degrees (black fill), scaled like MNIST."""
    if not math.isfinite(angle):
        raise InputError(
            f"the rotation angle {angle} is not a finite number of degrees; pass angles such "
            "as 0 45 90 (--angles)"
        )
    x = torch.from_numpy(split.images).float().unsqueeze(1) / 255.0
    a = math.radians(angle)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = nn.functional.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    x = nn.functional.grid_sample(x, grid, align_corners=False)
    return (x - MNIST_MEAN) / MNIST_STD


@dataclass
class Evaluation:
    """metrics: one row per (method, dataset, angle); ood: AUROC per method; settings used."""

    metrics: pd.DataFrame
    ood: pd.DataFrame
    samples: int
    scale: float

    def table(self, dataset: str = "mnist") -> pd.DataFrame:
        """accuracy / NLL / ECE / Brier per method on one dataset (unrotated)."""
        rows = self.metrics[(self.metrics.dataset == dataset) & (self.metrics.angle == 0)]
        return rows.set_index("method")[["accuracy", "nll", "ece", "brier"]]

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "scale": self.scale,
            "metrics": self.metrics.to_dict(orient="records"),
            "ood": self.ood.to_dict(orient="records"),
        }


def inputs(test: Split, ood: Split | None, angles: Iterable[float]) -> dict[str, torch.Tensor]:
    """The evaluation's input sets (CPU): `test` rotated by each nonzero angle, `test`, and
    `ood`."""
    sets = {f"rotated {a}": rotate(test, a) for a in angles if a != 0}
    sets["mnist"] = test.tensors("cpu")[0]
    if ood is not None:
        sets["ood"] = ood.tensors("cpu")[0]
    return sets


def evaluate(
    model: nn.Module,
    posterior: SWAGPosterior,
    test: Split,
    ood: Split | None = None,
    samples: int = 30,
    scale: float = 0.5,
    seed: int = 0,
    angles: Iterable[float] = ANGLES,
    executor: Any = None,
) -> Evaluation:
    """SGD (the model's current parameters), SWA (posterior mean) and SWAG (BMA over `samples`
    draws) on `test`, on `test` rotated by each angle, and OOD AUROC against `ood`.

    executor: nvmlib.dask.DaskExecutor(client): the SWAG draws are sampled and their predictions
    made on its workers; the same metrics as without one.
    """
    samples, scale = check_sampling(samples, scale)
    device = next(model.parameters()).device
    angles = list(angles)
    sets = {k: v.to(device) for k, v in inputs(test, ood, angles).items()}
    thetas = {
        "SGD": [get_flat(model).cpu().numpy()],
        "SWA": [posterior.mean()],
        "SWAG": posterior.sample(samples, scale=scale, seed=seed, executor=executor),
    }
    work = copy.deepcopy(model)  # takes each θ in turn: `model` is left as it is
    rows, ood_rows = [], []
    for method in METHODS:
        if executor is not None and method == "SWAG":  # the inputs are built on each worker
            probs = executor.bma(
                model, thetas[method], partial(inputs, test, ood, angles), update_bn=False
            )
        else:
            probs = bma(work, thetas[method], sets, update_bn=False)
        for name, p in probs.items():
            if name == "ood":
                continue
            angle = 0.0 if name == "mnist" else float(name.split()[1])
            dataset = "mnist" if name == "mnist" else "rotated mnist"
            rows.append(
                {
                    "method": method,
                    "dataset": dataset,
                    "angle": angle,
                    "accuracy": accuracy(p, test.labels),
                    "nll": nll(p, test.labels),
                    "ece": ece(p, test.labels),
                    "brier": brier(p, test.labels),
                }
            )
        if ood is not None:
            ood_rows.append(
                {
                    "method": method,
                    "in": "mnist",
                    "out": ood.dataset,
                    "auroc": auroc(entropy(probs["mnist"]), entropy(probs["ood"])),
                }
            )
    return Evaluation(pd.DataFrame(rows), pd.DataFrame(ood_rows), samples, scale)
