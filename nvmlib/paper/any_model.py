"""Bring your own model: SWAG and MultiSWAG through `nvmlib.SWAG` on a network that is not one
of the paper's (a small convolutional network with BatchNorm), against SGD and SWA.

Each run trains with SGD + momentum for `epochs` epochs, then keeps the learning rate and collects
an iterate every `collect_every` minibatches for `swag_epochs` epochs (SWAG's protocol). SGD is
the final iterate (with its own BatchNorm statistics), SWA the posterior mean, SWAG the BMA over
`samples` draws of run 0, MultiSWAG the BMA over `runs` independent runs × `samples` draws.
BatchNorm statistics of SWA and of every draw are recomputed on the training data.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nvmlib.nn import SWAG, MultiSWAG
from nvmlib.nn.predict import probabilities
from nvmlib.paper.data import load
from nvmlib.paper.evaluate import accuracy, brier, ece, nll, reliability_table
from nvmlib.progress import tqdm

METHODS = ("SGD", "SWA", "SWAG", "MultiSWAG")


def convnet(width: int = 16, classes: int = 10) -> nn.Module:
    """Two conv-BatchNorm-ReLU-pool blocks and a linear head, for 1×28×28 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 7 * 7, classes),
    )


class _Block(nn.Module):
    """ResNet's basic block: two 3x3 conv-BatchNorm layers and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Sequential()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(classes: int = 10, channels: int = 3) -> nn.Module:
    """ResNet-18 for 32×32 inputs (CIFAR's stem): 11,173,962 parameters with 10 classes."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


@dataclass
class Protocol:
    """Everything a run of the experiment depends on."""

    dataset: str = "fashion"
    limit: int | None = 2_000  # training examples
    test_limit: int | None = None
    width: int = 8
    epochs: int = 6  # SGD before collection
    swag_epochs: int = 3  # epochs of collection
    collect_every: int = 5  # minibatches between iterates
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    max_rank: int = 20
    runs: int = 2  # MultiSWAG's independent runs
    samples: int = 8  # draws per run
    scale: float = 0.5
    bn_examples: int = 2_000  # training examples BatchNorm statistics are recomputed on
    seed: int = 0


def _train(
    protocol: Protocol, seed: int, x: torch.Tensor, y: torch.Tensor, tier: str, path: Path | None
) -> tuple[SWAG, nn.Module, dict[str, float]]:
    """One run: SGD, then SWAG collection; (swag, SGD model, mean seconds per training step and
    median seconds per collect)."""
    torch.manual_seed(seed)
    model = convnet(protocol.width)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=protocol.lr,
        momentum=protocol.momentum,
        weight_decay=protocol.weight_decay,
    )
    swag = SWAG(model, tier, path, max_rank=protocol.max_rank, overwrite=True)
    gen = torch.Generator().manual_seed(seed)
    train_s, steps, collect_s = 0.0, 0, []
    for epoch in range(protocol.epochs + protocol.swag_epochs):
        model.train()
        for b, idx in enumerate(torch.randperm(len(x), generator=gen).split(protocol.batch_size)):
            t = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            train_s += time.perf_counter() - t
            steps += 1
            if epoch >= protocol.epochs and (b + 1) % protocol.collect_every == 0:
                t = time.perf_counter()
                swag.collect()
                collect_s.append(time.perf_counter() - t)
    cost = {
        "train_step_s": train_s / steps,
        "collect_s": float(np.median(collect_s)),
        "collects": len(collect_s),
        "row_bytes": 4 * sum(p.numel() for p in model.parameters()),
    }
    return swag, model, cost


def run(
    protocol: Protocol, tier: str = "dram", root: str | Path | None = None
) -> dict[str, pd.DataFrame]:
    """Train `protocol.runs` runs and evaluate SGD, SWA, SWAG and MultiSWAG on the test split.

    Tables: metrics (method, run, accuracy, nll, ece, brier: SGD, SWA and SWAG per run, MultiSWAG
    over all runs), reliability (run 0 and MultiSWAG, per confidence bin), cost (seconds per
    training step and per collect, per run).
    """
    x, y = load(protocol.dataset, "train", limit=protocol.limit).tensors()
    tx, ty = load(protocol.dataset, "test", limit=protocol.test_limit).tensors()
    labels = ty.numpy()
    bn = x[: protocol.bn_examples]
    runs, costs, rows, probs = [], [], [], {}
    try:
        for i in tqdm(range(protocol.runs), desc="training runs", unit="run"):
            path = None if root is None else Path(root) / f"run{i}"
            swag, sgd, cost = _train(protocol, protocol.seed * 1000 + i, x, y, tier, path)
            runs.append(swag)
            costs.append({"run": i, **cost})
            run_probs = {
                "SGD": probabilities(sgd.eval(), tx),
                "SWA": probabilities(swag.mean_model(bn), tx),
            }
            for method, p in run_probs.items():
                rows.append({"method": method, "run": str(i), **metrics(p, labels)})
            if i == 0:
                probs.update(run_probs)
        multi = MultiSWAG(runs)
        per_run = multi.predict_runs(tx, protocol.samples, bn, protocol.scale, protocol.seed)
        for i, p in enumerate(per_run):
            rows.append({"method": "SWAG", "run": str(i), **metrics(p, labels)})
        probs["SWAG"], probs["MultiSWAG"] = per_run[0], np.mean(per_run, axis=0)
    finally:
        for swag in runs:
            swag.close()
    rows.append({"method": "MultiSWAG", "run": "all", **metrics(probs["MultiSWAG"], labels)})
    reliability = pd.concat(
        [reliability_table(probs[m], labels).assign(method=m) for m in METHODS], ignore_index=True
    )
    cost = pd.DataFrame(costs)
    cost["collect_overhead"] = (cost.train_step_s + cost.collect_s) / cost.train_step_s
    return {"metrics": pd.DataFrame(rows), "reliability": reliability, "cost": cost}


def lightning_run(
    protocol: Protocol, tier: str = "dram", root: str | Path | None = None
) -> dict[str, Any]:
    """Run 0's network and schedule trained by PyTorch Lightning, its SWAG collected by the one
    line nvmlib.lightning.SWAGCallback(...): SWAG's test metrics, iterates collected, seconds."""
    import logging
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from nvmlib.lightning import SWAGCallback

    class Classifier(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(
                self.parameters(),
                lr=protocol.lr,
                momentum=protocol.momentum,
                weight_decay=protocol.weight_decay,
            )

    x, y = load(protocol.dataset, "train", limit=protocol.limit).tensors()
    tx, ty = load(protocol.dataset, "test", limit=protocol.test_limit).tensors()
    torch.manual_seed(protocol.seed * 1000)
    module = Classifier(convnet(protocol.width))
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=protocol.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(protocol.seed),
    )
    cb = SWAGCallback(
        tier,
        None if root is None else Path(root) / "lightning",
        max_rank=protocol.max_rank,
        start_epoch=protocol.epochs,
        every_n_steps=protocol.collect_every,
        overwrite=True,
    )
    t = time.perf_counter()
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "GPU available: False" and tips lines
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            pl.Trainer(
                max_epochs=protocol.epochs + protocol.swag_epochs,
                callbacks=[cb],
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
            ).fit(module, loader)
    finally:
        quiet.setLevel(level)
    seconds = time.perf_counter() - t
    try:
        probs = cb.swag.predict(
            tx, protocol.samples, x[: protocol.bn_examples], protocol.scale, protocol.seed
        )
        return {"collected": cb.swag.n_collected, "fit_s": seconds, **metrics(probs, ty.numpy())}
    finally:
        cb.swag.close()


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method: run 0 for SGD, SWA and SWAG, all runs for MultiSWAG."""
    rows = table[(table.run == "0") | (table.method == "MultiSWAG")]
    return rows.set_index("method").loc[list(METHODS), ["accuracy", "nll", "ece", "brier"]]


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, NLL, ECE and Brier of predicted probabilities."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels),
        "brier": brier(probs, labels),
    }


def parameters(protocol: Protocol) -> dict[str, Any]:
    """The protocol as a JSON-ready dict (for the notebook's record)."""
    return asdict(protocol)
