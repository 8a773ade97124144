"""The per-update arithmetic of the posterior: numba kernels on every core (no GIL).

`stage` casts θ into a row buffer of the log's dtype and finds any value that is not finite there
(NaN, Inf, or an overflow of the log's dtype) in the same pass; `add_rows` adds a batch of stored
rows to the shifted float64 moments Σ(θ−θ₀) and Σ(θ−θ₀)², which `Moments` holds, reading and writing
the sums once per group of GROUP rows (36 bytes of memory traffic per parameter for one row, 4 +
40/8 per row in a group). Both split the parameters into blocks that the threads of numba's
threading layer take (`parallel=True`); each element's sums see its rows in order, so a batch gives
the same bits as its rows added one at a time, whatever the number of threads. numba has no float16,
so float16 goes through numpy (exactly: float16 → float32 is lossless).

Threads (`THREADS`): all but one of the cores this process may run on, the one left to the threads
that stamp (digest) and write rows behind the kernels: measured on 2 shared cores, a kernel on both
made update() slower (omp threads waiting on a busy core starve the writer); NUMBA_NUM_THREADS, when
set, is used instead (capped at the cores). On one thread the kernels' serial forms run, from any
number of Python threads at once (the moments' thread adds rows while the caller stages the next
one); on more, the omp and tbb layers take kernels from several threads at once, the workqueue layer
does not, so there every launch is serialised by a lock.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable

import numba
import numpy as np

from nvmlib.backends.base import Store, aligned_empty
from nvmlib.posterior.checksum import digest
from nvmlib.posterior.layout import MOMENTS, SHIFT

BLOCK = 1 << 16  # parameters a thread takes at a time
TILE = 8192  # parameters whose sums stay in L2 while a batch's rows are added to them
GROUP = 8  # rows added per load of the sums (_add_block unrolls this many)
CORES = len(os.sched_getaffinity(0))
# a threading layer that survives fork (GNU OpenMP's does not): DataLoader workers, dask nannies
# and crash tests fork processes that have run a kernel; tbb where installed, else workqueue
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "forksafe"
THREADS = max(
    1,
    min(numba.config.NUMBA_NUM_THREADS, CORES if "NUMBA_NUM_THREADS" in os.environ else CORES - 1),
)
_LAUNCH = threading.Lock()  # serialises kernel launches on a threading layer that is not threadsafe
_threadsafe: bool | None = None  # whether the layer numba loaded takes concurrent launches
# numba.set_num_threads takes a lock shared with every process forked from this one: a process
# killed while holding it would hang the others' next call, so each thread calls it once
_counted = threading.local()


@numba.njit(nogil=True, cache=True)
def _stage_block(src: np.ndarray, dst: np.ndarray) -> bool:
    bad = False
    for i in range(src.shape[0]):  # from 0 and no early exit: the loop vectorises
        dst[i] = src[i]
        bad |= not np.isfinite(dst[i])
    return not bad


@numba.njit(nogil=True, cache=True, parallel=True)
def _stage(src: np.ndarray, dst: np.ndarray) -> bool:
    n = src.shape[0]
    bad = 0
    for b in numba.prange((n + BLOCK - 1) // BLOCK):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        if not _stage_block(src[lo:hi], dst[lo:hi]):
            bad += 1
    return bad == 0


@numba.njit(nogil=True, cache=True)
def _finite_block(x: np.ndarray) -> bool:
    bad = False
    for i in range(x.shape[0]):
        bad |= not np.isfinite(x[i])
    return not bad


@numba.njit(nogil=True, cache=True, parallel=True)
def _finite(x: np.ndarray) -> bool:
    n = x.shape[0]
    bad = 0
    for b in numba.prange((n + BLOCK - 1) // BLOCK):
        if not _finite_block(x[b * BLOCK : min(n, (b + 1) * BLOCK)]):
            bad += 1
    return bad == 0


@numba.njit(nogil=True, cache=True, inline="always")
def _acc(x: float, y: float, value: float, shift: float) -> tuple[float, float]:
    d = np.float64(value) - shift
    return x + d, y + d * d


@numba.njit(nogil=True, cache=True)
def _add_block(
    rows: np.ndarray,
    first: int,
    count: int,
    shift: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    lo: int,
    hi: int,
) -> None:
    """Rows in groups of GROUP: each element's sums are loaded once per group and its rows added
    in order in registers (the same bits as one row at a time, a fifth of the sums' traffic)."""
    ring = rows.shape[0]
    for a in range(lo, hi, TILE):
        m = min(hi, a + TILE) - a
        t1, t2, sh = s1[a : a + m], s2[a : a + m], shift[a : a + m]
        r = 0
        while r + GROUP <= count:
            b = first + r
            r0, r1 = rows[b % ring, a : a + m], rows[(b + 1) % ring, a : a + m]
            r2, r3 = rows[(b + 2) % ring, a : a + m], rows[(b + 3) % ring, a : a + m]
            r4, r5 = rows[(b + 4) % ring, a : a + m], rows[(b + 5) % ring, a : a + m]
            r6, r7 = rows[(b + 6) % ring, a : a + m], rows[(b + 7) % ring, a : a + m]
            for i in range(m):  # from 0: the loop vectorises
                s, x, y = sh[i], t1[i], t2[i]
                x, y = _acc(x, y, r0[i], s)
                x, y = _acc(x, y, r1[i], s)
                x, y = _acc(x, y, r2[i], s)
                x, y = _acc(x, y, r3[i], s)
                x, y = _acc(x, y, r4[i], s)
                x, y = _acc(x, y, r5[i], s)
                x, y = _acc(x, y, r6[i], s)
                x, y = _acc(x, y, r7[i], s)
                t1[i], t2[i] = x, y
            r += GROUP
        for j in range(r, count):
            row = rows[(first + j) % ring, a : a + m]
            for i in range(m):
                t1[i], t2[i] = _acc(t1[i], t2[i], row[i], sh[i])


@numba.njit(nogil=True, cache=True, parallel=True)
def _add_rows(
    rows: np.ndarray, first: int, count: int, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray
) -> None:
    n = shift.shape[0]
    for b in numba.prange((n + BLOCK - 1) // BLOCK):
        _add_block(rows, first, count, shift, s1, s2, b * BLOCK, min(n, (b + 1) * BLOCK))


@numba.njit(nogil=True, cache=True)
def _add_rows_serial(
    rows: np.ndarray, first: int, count: int, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray
) -> None:
    _add_block(rows, first, count, shift, s1, s2, 0, shift.shape[0])


def _launch(kernel, serial, *args):  # type: ignore[no-untyped-def]
    """Run a parallel kernel on THREADS threads (numba's count is per calling thread); on one
    thread, its serial form, which needs no lock: the moments' thread and the stager then run
    at once on any layer."""
    global _threadsafe
    if THREADS == 1:
        return serial(*args)
    if not getattr(_counted, "set", False):  # numba's count is per thread, and stays set
        numba.set_num_threads(THREADS)
        _counted.set = True
    if _threadsafe:
        return kernel(*args)
    with _LAUNCH:
        out = kernel(*args)
        _threadsafe = numba.threading_layer() != "workqueue"
    return out


def stage(src: np.ndarray, dst: np.ndarray) -> bool:
    """Copy `src` into `dst` (casting to dst's dtype); whether every copied value is finite."""
    if np.float16 in (src.dtype, dst.dtype):
        with np.errstate(over="ignore", invalid="ignore"):
            dst[...] = src
        return bool(np.isfinite(dst).all())
    return bool(_launch(_stage, _stage_block, src, dst))


def finite(x: np.ndarray) -> bool:
    """Whether every value of the 1-D `x` is finite (one parallel pass, no copy)."""
    if x.dtype == np.float16:
        return bool(np.isfinite(x).all())
    return bool(_launch(_finite, _finite_block, x))


def warm(dtype: np.dtype) -> None:
    """Load `stage` for float32 iterates and rows of `dtype`, and `finite` for such rows, now:
    numba's first call in a process takes about a second, better spent when a posterior is made
    than in the first update."""
    stage(np.zeros(1, np.float32), np.zeros(1, dtype))
    finite(np.zeros(1, dtype))


def add_rows(
    rows: np.ndarray,
    shift: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    first: int = 0,
    count: int | None = None,
) -> None:
    """s1 += row − shift and s2 += (row − shift)², in float64, for rows first, first+1, … of the
    (B, n) array `rows` (`count` of them, all by default; indices modulo B: a ring), in order."""
    count = len(rows) if count is None else count
    if count:
        if rows.dtype == np.float16:
            rows = rows.astype(np.float32)
        _launch(_add_rows, _add_rows_serial, rows, first, count, shift, s1, s2)


class Moments(ABC):
    """A posterior's running sums relative to its first iterate θ₀ (`shift`, float64):
    [Σ(θ−θ₀), Σ(θ−θ₀)²] in float64, as a checkpoint slot holds them (padded to `padded`).
    Where the sums live is the implementation's: HostMoments (RAM), TorchMoments (a torch
    device, nvmlib.posterior.moments_torch), StoreMoments (the posterior's tier,
    nvmlib.posterior.moments_store). The slot and shift methods move them to and from the tier's
    checkpoint arrays (MOMENTS, SHIFT)."""

    # a checkpoint written behind training copies the sums (snapshot) on the moments' thread and
    # writes the copy; False: write_slot itself runs there (the sums are already on the tier)
    FROZEN = True

    def __init__(self, n_params: int, padded: int) -> None:
        self.n_params, self.padded = n_params, padded
        self.shift = np.full(n_params, 0.0)  # its pages touched now, not in the first update

    @abstractmethod
    def add_rows(self, rows: np.ndarray, first: int = 0, count: int | None = None) -> None:
        """Add stored rows (the log's dtype) in one pass over the sums: rows first, first+1, …
        (`count` of them, all by default) of the (B, n_params) array `rows`, indices modulo B (a
        ring of staged rows), in order."""

    def add(self, row: np.ndarray) -> None:
        """Add one stored row."""
        self.add_rows(row[None])

    @abstractmethod
    def sums(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Σ(θ−θ₀) and Σ(θ−θ₀)² of parameters a..b−1, host float64."""

    @abstractmethod
    def snapshot(self, out: np.ndarray | None = None) -> np.ndarray:
        """The sums as a checkpoint slot holds them, (2, padded) float64 on the host: copied into
        `out`, or (None) an array not to be changed (the sums themselves where they are on the
        host)."""

    @abstractmethod
    def load(self, block: np.ndarray) -> None:
        """Make the sums those of a checkpoint slot's `block` ((2, padded) host float64)."""

    def set_shift(self, values: np.ndarray) -> None:
        """Make θ₀ `values` (the first iterate)."""
        self.shift[:] = values

    def shift_of(self, a: int, b: int) -> np.ndarray:
        """θ₀ of parameters a..b−1 (float64)."""
        return self.shift[a:b]

    def shift_digest(self, ident: int) -> int:
        """The digest of θ₀ (as the tier's SHIFT array holds it)."""
        return digest(self.shift, ident)

    def write_shift(self, store: Store) -> None:
        """Write θ₀ to the tier's SHIFT array (not persisted)."""
        store.write_rows(SHIFT, 0, self.shift)

    def read_shift(self, store: Store, ident: int) -> tuple[int, Callable[[], None]]:
        """The digest of the tier's SHIFT, and a function that makes it θ₀."""
        shift = store.read_rows(SHIFT, 0, self.n_params)
        return digest(shift, ident), lambda: self.set_shift(shift)

    def write_slot(
        self, store: Store, slot: int, ident: int, block: np.ndarray | None = None
    ) -> int:
        """Write the sums (or their snapshot `block`) into checkpoint slot `slot` of the tier's
        MOMENTS (not persisted); their digest."""
        block = self.snapshot() if block is None else block
        store.write_rows(MOMENTS, slot, block[None])
        return digest(block, ident)

    def read_slot(self, store: Store, slot: int, ident: int) -> tuple[int, Callable[[], None]]:
        """The digest of checkpoint slot `slot` on the tier, and a function that loads it."""
        block = store.read_rows(MOMENTS, slot, slot + 1)[0]
        return digest(block, ident), lambda: self.load(block)

    def mean(self, count: int, a: int = 0, b: int | None = None) -> np.ndarray:
        """θ̄ after `count` iterates (float64), of parameters a..b−1 (all: b None)."""
        b = self.n_params if b is None else b
        return self.shift_of(a, b) + self.sums(a, b)[0] / count

    def variance(self, count: int, a: int = 0, b: int | None = None) -> np.ndarray:
        """Σ_diag = E[θ²] − θ̄², clamped at 0 (float64), of parameters a..b−1 (all: b None)."""
        b = self.n_params if b is None else b
        s1, s2 = self.sums(a, b)
        m = s1 / count
        return np.maximum(s2 / count - m * m, 0.0)

    def clear(self) -> None:
        """The sums of no iterates."""
        self.load(np.zeros((2, self.padded)))
        self.set_shift(np.zeros(self.n_params))

    def saved(self) -> Any:
        """A copy to restore() (a refused call changes nothing)."""
        return self.snapshot(np.empty((2, self.padded))), self.shift.copy()

    def restore(self, saved: Any) -> None:
        self.load(saved[0])
        self.set_shift(saved[1])

    def close(self) -> None:
        """Release what the sums hold (memory, device memory, scratch arrays on the tier): a
        closed posterior reads nothing more."""
        self.shift = np.empty(0)


class HostMoments(Moments):
    """The sums in RAM (16 bytes a parameter), added by the numba kernels."""

    def __init__(self, n_params: int, padded: int) -> None:
        super().__init__(n_params, padded)
        self.block = aligned_empty((2, padded), np.float64)
        self.block[:] = 0
        self.s1, self.s2 = self.block[0, :n_params], self.block[1, :n_params]

    def add_rows(self, rows: np.ndarray, first: int = 0, count: int | None = None) -> None:
        add_rows(rows, self.shift, self.s1, self.s2, first, count)

    def sums(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return self.s1[a:b], self.s2[a:b]

    def snapshot(self, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return self.block
        np.copyto(out, self.block)
        return out

    def load(self, block: np.ndarray) -> None:
        self.block[:] = block

    def close(self) -> None:
        super().close()
        self.block = np.empty((2, 0))
        self.s1, self.s2 = self.block
