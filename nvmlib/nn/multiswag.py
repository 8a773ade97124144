"""MultiSWAG (Wilson & Izmailov 2020): M independent SWAG runs of one architecture, side by side,
and one Bayesian model average over all M × S models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from nvmlib.errors import ConfigError, PosteriorError
from nvmlib.nn.predict import Loader
from nvmlib.nn.swag import SWAG, fingerprint


class MultiSWAG:
    """M independent SWAG runs of one architecture, kept side by side (root/run0, root/run1, …),
    and one Bayesian model average over all of them (M runs × S samples)."""

    def __init__(self, runs: Sequence[SWAG]) -> None:
        if not runs:
            raise ValueError("MultiSWAG needs at least one run")
        self.runs = list(runs)

    @classmethod
    def create(
        cls,
        models: Sequence[nn.Module],
        tier: str = "dram",
        root: str | Path | None = None,
        **options: Any,
    ) -> "MultiSWAG":
        """One new posterior per model (independently initialised copies of one architecture)."""
        if len({fingerprint(m) for m in models}) > 1:
            raise ConfigError("MultiSWAG runs must share one architecture; the models given differ")
        runs: list[SWAG] = []
        try:
            for i, model in enumerate(models):
                runs.append(SWAG(model, tier, cls._run_path(root, i), **options))
        except BaseException:
            for run in runs:
                run.close()
            raise
        return cls(runs)

    @classmethod
    def open(cls, model: nn.Module, tier: str, root: str | Path, **options: Any) -> "MultiSWAG":
        """Every run under `root`, for sampling and prediction (read-only unless readonly=False)."""
        paths = sorted(
            (p for p in Path(root).glob("run*") if p.name[3:].isdigit()),
            key=lambda p: int(p.name[3:]),
        )
        if not paths:
            raise PosteriorError(f"{root} holds no MultiSWAG runs (run0, run1, …); check the path")
        options.setdefault("readonly", True)
        runs: list[SWAG] = []
        try:
            for path in paths:
                runs.append(SWAG.open(model, tier, path, **options))
        except BaseException:
            for run in runs:
                run.close()
            raise
        return cls(runs)

    @staticmethod
    def _run_path(root: str | Path | None, i: int) -> Path | None:
        return None if root is None else Path(root) / f"run{i}"

    def __len__(self) -> int:
        return len(self.runs)

    def predict_runs(
        self,
        loader: Loader,
        S: int = 30,
        bn_loader: Loader | None = None,
        scale: float = 0.5,
        seed: int = 0,
        update_bn: bool = True,
        memory_budget: float | None = None,
    ) -> list[np.ndarray]:
        """Each run's BMA (N, classes) over S samples; run i draws with its own seed from `seed`
        (memory_budget: as SWAG.predict, for each run's S draws in turn)."""
        seeds = np.random.SeedSequence(seed).generate_state(len(self.runs))
        return [
            run.predict(loader, S, bn_loader, scale, int(s), update_bn, memory_budget=memory_budget)
            for run, s in zip(self.runs, seeds, strict=True)
        ]

    def predict(
        self,
        loader: Loader,
        S: int = 30,
        bn_loader: Loader | None = None,
        scale: float = 0.5,
        seed: int = 0,
        update_bn: bool = True,
        memory_budget: float | None = None,
    ) -> np.ndarray:
        """The BMA over all M × S models (N, classes) float64; memory_budget as SWAG.predict."""
        runs = self.predict_runs(loader, S, bn_loader, scale, seed, update_bn, memory_budget)
        return np.mean(runs, axis=0)

    def close(self) -> None:
        for run in self.runs:
            run.close()

    def __enter__(self) -> "MultiSWAG":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
