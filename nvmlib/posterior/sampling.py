"""Drawing from a SWAG posterior: θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), and the one D·z₂ kernel that
every caller uses (a posterior's own pass over its log, a sharded posterior, a dask worker's share)."""
from __future__ import annotations

import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np
import torch

from nvmlib.errors import InputError


def check_sampling(S: Any, scale: Any) -> tuple[int, float]:
    """(S, scale) as int and float (numpy scalars welcome), or an InputError naming the bad one:
    every layer that draws from a posterior checks its arguments here."""
    if isinstance(S, bool) or not isinstance(S, numbers.Integral) or S < 1:
        raise InputError(f"S={S!r}: the number of draws must be an integer >= 1 (e.g. 30)")
    if (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)
            or scale < 0):
        raise InputError(f"scale={scale!r}: the covariance scale must be a finite number >= 0 "
                         "(0.5 in Maddox et al.)")
    return int(S), float(scale)


def low_rank(batches: Iterable[tuple[int, np.ndarray]], z2: torch.Tensor, mean: np.ndarray,
             first: int) -> torch.Tensor:
    """Σ_k z₂ₖ (θ_k − θ̄) over the rows of `batches` ((first iterate, rows) pairs, rows in any
    order; iterate t takes row t − first of z2 (K, S)), (S, n_params) in z2's dtype. The rows are
    centred in place, in mean's dtype."""
    acc = torch.zeros((z2.shape[1], len(mean)), dtype=z2.dtype)
    for t, rows in batches:
        rows = rows.astype(mean.dtype, copy=False)
        rows -= mean
        acc.addmm_(z2[t - first:t - first + len(rows)].T, torch.from_numpy(rows))  # += z2ᵀ·rows
    return acc


def draw(S: int, scale: float, seed: int | None, mean: np.ndarray, variance: np.ndarray, K: int,
         work: type, low_rank: Callable[[torch.Tensor, np.ndarray], torch.Tensor]) -> np.ndarray:
    """S draws θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), (S, n) float32: z₁ (S, n) and z₂ (K, S) come from
    `seed` alone, so posteriors of the same iterates (one log, or the shards of one run) draw the
    same models; low_rank(z2, θ̄) gives Σ_k z₂ₖ (θ_k − θ̄) and runs while σ⊙z₁ is drawn on a thread."""
    S, scale = check_sampling(S, scale)
    mean = mean.astype(work)
    sigma = np.sqrt(variance).astype(work)
    seed_z1, seed_z2 = np.random.SeedSequence(seed).spawn(2)

    def diagonal() -> np.ndarray:
        z1 = np.random.default_rng(seed_z1).standard_normal((S, len(mean)), dtype=work)
        z1 *= sigma
        return z1

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(diagonal)
        if K >= 2:
            z2 = torch.from_numpy(np.random.default_rng(seed_z2).standard_normal((K, S)).astype(work))
            acc = low_rank(z2, mean)
            acc /= math.sqrt(K - 1)
        out = pending.result()
    if K >= 2:
        out += acc.numpy()
    out *= math.sqrt(scale)
    out += mean
    return out.astype(np.float32, copy=False)
