"""The per-update arithmetic of the posterior, fused into single passes (numba, no GIL).

`stage` casts θ into the log's row buffer and finds any value that is not finite there (NaN,
Inf, or an overflow of the log's dtype) in the same pass; `add` adds a stored row to the
shifted float64 moments Σ(θ−θ₀) and Σ(θ−θ₀)², which `Moments` holds. numba has no float16, so float16 goes through
numpy (exactly: float16 → float32 is lossless).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from nvmlib.backends.base import aligned_empty


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


PARALLEL_MIN = 1 << 16  # parameters from which a row is added on two threads


class Moments:
    """A posterior's running sums, relative to its first iterate θ₀ (`shift`): `block` holds
    [Σ(θ−θ₀), Σ(θ−θ₀)²] in float64, padded as the store's checkpoint slots are."""

    def __init__(self, n_params: int, padded: int) -> None:
        self.n_params = n_params
        self.block = aligned_empty((2, padded), np.float64)
        self.block[:] = 0
        self.s1, self.s2 = self.block[0, :n_params], self.block[1, :n_params]
        self.shift = np.zeros(n_params)
        self._pool: ThreadPoolExecutor | None = None

    def add(self, row: np.ndarray) -> None:
        """Add a stored row; a large one's second half on a thread (the kernel releases the GIL)."""
        if self.n_params < PARALLEL_MIN:
            return self._add(row, 0, self.n_params)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="nvmlib-moments")
        half = self.n_params // 2
        other = self._pool.submit(self._add, row, half, self.n_params)
        self._add(row, 0, half)
        other.result()

    def _add(self, row: np.ndarray, a: int, b: int) -> None:
        add(row[a:b], self.shift[a:b], self.s1[a:b], self.s2[a:b])

    def mean(self, count: int, a: int = 0, b: int | None = None) -> np.ndarray:
        """θ̄ after `count` iterates (float64), of parameters a..b−1 (all: b None)."""
        return self.shift[a:b] + self.s1[a:b] / count

    def variance(self, count: int, a: int = 0, b: int | None = None) -> np.ndarray:
        """Σ_diag = E[θ²] − θ̄², clamped at 0 (float64), of parameters a..b−1 (all: b None)."""
        m = self.s1[a:b] / count
        return np.maximum(self.s2[a:b] / count - m * m, 0.0)

    def clear(self) -> None:
        """The sums of no iterates."""
        self.block[:] = 0
        self.shift[:] = 0

    def saved(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy to restore() (a refused call changes nothing)."""
        return self.block.copy(), self.shift.copy()

    def restore(self, saved: tuple[np.ndarray, np.ndarray]) -> None:
        self.block[:], self.shift[:] = saved

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
