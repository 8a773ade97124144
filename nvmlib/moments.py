"""The per-update arithmetic of the posterior, fused into single passes (numba, no GIL).

`stage` casts θ into the log's row buffer and finds any value that is not finite there (NaN,
Inf, or an overflow of the log's dtype) in the same pass; `add` adds a stored row to the
shifted float64 moments Σ(θ−θ₀) and Σ(θ−θ₀)². numba has no float16, so float16 goes through
numpy (exactly: float16 → float32 is lossless).
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _stage(src: np.ndarray, dst: np.ndarray) -> bool:
    bad = False
    for i in range(src.shape[0]):  # no early exit: the loop vectorises
        dst[i] = src[i]
        bad |= not np.isfinite(dst[i])
    return not bad


@numba.njit(nogil=True, cache=True)
def _add(row: np.ndarray, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
    for i in range(row.shape[0]):
        d = np.float64(row[i]) - shift[i]
        s1[i] += d
        s2[i] += d * d


def stage(src: np.ndarray, dst: np.ndarray) -> bool:
    """Copy `src` into `dst` (casting to dst's dtype); whether every copied value is finite."""
    if np.float16 in (src.dtype, dst.dtype):
        with np.errstate(over="ignore", invalid="ignore"):
            dst[...] = src
        return bool(np.isfinite(dst).all())
    return bool(_stage(src, dst))


def add(row: np.ndarray, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
    """s1 += row − shift and s2 += (row − shift)², elementwise in float64."""
    _add(row.astype(np.float32) if row.dtype == np.float16 else row, shift, s1, s2)
