"""The SWAG posterior: a log of raw iterates on a memory tier, moments in DRAM, crash-safe.

Layout on the store (all arrays fixed-shape, so every tier can hold them):
  swag.meta     uint8 JSON: n_params, max_rank, capacity, row_len, moments_len, dtype, checkpoint_every, model
  swag.log      (capacity + 1, row_len) raw iterates, sample-major, a ring when max_rank is set;
                iterate t sits in slot t % (capacity + 1), so the row being written never
                overwrites one of the `capacity` kept rows (a crash mid-write tears nothing kept);
                row_len is n_params padded to the tier's row_align (4 KiB rows for O_DIRECT)
  swag.count    int64 (1,): updates whose row is fully written (the log's commit point)
  swag.shift    float64 (n_params,): the first iterate; moments are kept relative to it
  swag.moments  float64 (2, 2, moments_len): two checkpoint slots of [Σ(θ−θ₀), Σ(θ−θ₀)²]
                (n_params padded to the tier's row_align, like the log's rows)
  swag.commit   int64 (2, 4): per slot [seq, count, crc32 of the slot's moments, crc32 of the record]
An update appends one row, then bumps swag.count. Every `checkpoint_every` updates the moments
go to the older slot and then its commit record; a torn record or slot fails its checksum and
recovery falls back to the other one. Recovery = newest valid checkpoint + replay of the rows
appended after it, which are still in the log (checkpoint_every <= capacity / 2 guarantees it).
"""
from __future__ import annotations

import json
import math
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from nvmlib import moments
from nvmlib.backends.base import ALIGN, Store, aligned_empty, check_fits, padded_len
from nvmlib.errors import PosteriorError, StoreError

FORMAT = 2
META, LOG, COUNT, SHIFT, MOMENTS, COMMIT = (
    "swag.meta", "swag.log", "swag.count", "swag.shift", "swag.moments", "swag.commit")
FLOAT_DTYPES = ("float16", "float32", "float64")
CHUNK_BYTES = 128 << 20
PARALLEL_MIN = 1 << 16  # parameters from which the moments are added on two threads


def _as_vector(theta: Any, n_params: int) -> np.ndarray:
    """θ as a 1-D float numpy array of n_params, or a ValueError/TypeError that says what is wrong."""
    if hasattr(theta, "detach"):  # torch tensor, CPU or CUDA
        theta = theta.detach().to("cpu").numpy()
    arr = np.asarray(theta)
    if arr.dtype.kind not in "f":
        raise TypeError(f"θ has dtype {arr.dtype}; parameters must be floating point "
                        "(float16/32/64): pass the model's flat parameter vector")
    if arr.shape != (n_params,):
        raise ValueError(f"θ has shape {arr.shape} but this posterior holds {n_params} parameters: "
                         f"pass a 1-D vector of length {n_params} (flatten the model's parameters)")
    return arr


def _not_finite(vec: np.ndarray, dtype: np.dtype) -> ValueError:
    """The error for a θ that has NaN/Inf values, or values its posterior's dtype cannot hold."""
    bad = ~np.isfinite(vec)
    if bad.any():
        return ValueError(f"θ has {int(bad.sum())} NaN/Inf values (first at index {int(np.flatnonzero(bad)[0])}); "
                          "training diverged: lower the learning rate. The posterior was not changed")
    return ValueError(f"θ overflows {dtype} (|θ| up to {np.abs(vec).max():.3g}); "
                      "store the posterior as float32 or float64. The posterior was not changed")


def _crc(*arrays: np.ndarray) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"), crc)
    return crc


class SWAGPosterior:
    """SWAG: N(θ̄, scale·(Σ_diag + D Dᵀ/(K−1))) from iterates kept on a memory tier."""

    def __init__(self, store: Store, meta: dict, readonly: bool) -> None:
        self.store = store
        self.meta = meta
        self.n_params: int = meta["n_params"]
        self.max_rank: int | None = meta["max_rank"]
        self.capacity: int = meta["capacity"]
        self.slots = self.capacity + 1
        self.row_len: int = meta["row_len"]
        self.dtype = np.dtype(meta["dtype"])
        self.checkpoint_every: int = meta["checkpoint_every"]
        self.readonly = readonly
        self._count = 0
        self._seq = 0
        self._ckpt_count = 0
        self._moments = aligned_empty((2, meta["moments_len"]), np.float64)  # the checkpoint block
        self._moments[:] = 0
        self._s1, self._s2 = self._moments[0, :self.n_params], self._moments[1, :self.n_params]
        self._shift = np.zeros(self.n_params)
        self._row = aligned_empty((self.row_len,), self.dtype)  # the next row, padded with zeros
        self._row[self.n_params:] = 0
        self._io: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # the write of row self._count, while in flight
        self._closed = False

    # ---- creating and opening -----------------------------------------------------------
    @staticmethod
    def required_bytes(n_params: int, rows: int, dtype: str = "float32", row_align: int = ALIGN) -> int:
        """Bytes a posterior of `rows` kept iterates needs on a tier (one spare slot for the next row)."""
        row = padded_len(n_params, dtype, row_align) * np.dtype(dtype).itemsize
        return (rows + 1) * row + (4 * padded_len(n_params, "float64", row_align) + n_params) * 8 + 8 * 4096

    @classmethod
    def create(cls, store: Store, n_params: int, max_rank: int | None = None, dtype: str = "float32",
               checkpoint_every: int = 100, capacity: int | None = None, model: str | None = None,
               overwrite: bool = False) -> "SWAGPosterior":
        """A new, empty posterior on `store`. max_rank=None keeps every iterate (up to `capacity`)."""
        if not isinstance(n_params, (int, np.integer)) or n_params < 1:
            raise ValueError(f"n_params must be a positive integer, not {n_params!r}")
        if max_rank is not None and max_rank < 2:
            raise ValueError(f"max_rank={max_rank}: the low-rank part needs at least 2 iterates "
                             "(K−1 divides D Dᵀ); use max_rank >= 2 or None to keep all")
        if str(np.dtype(dtype)) not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        if max_rank is None and capacity is None:
            raise ValueError("max_rank=None keeps every iterate: pass capacity=<number of updates> "
                             "so the tier can reserve the log (nvmlib train computes it)")
        cap = int(max_rank if max_rank is not None else capacity)
        if cap < 2:
            raise ValueError(f"capacity={cap}: a posterior needs room for at least 2 iterates")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, not {checkpoint_every}")
        store.lock(LOG)
        try:
            if META in store:
                if not overwrite:
                    raise PosteriorError(f"{store.describe()} already holds a posterior; open it with "
                                         "SWAGPosterior.open, pass overwrite=True (train: --overwrite), "
                                         "or choose another path")
            old = [n for n in (META, LOG, COUNT, SHIFT, MOMENTS, COMMIT) if n in store]  # or a torn create's
            check_fits(store, cls.required_bytes(int(n_params), cap, dtype, store.row_align), f"a posterior of {cap} "
                       f"iterates × {n_params} parameters ({np.dtype(dtype)})",
                       reclaimable=sum(store.nbytes(n) for n in old))
            for name in old:
                store.delete(name)
            row_len = padded_len(int(n_params), dtype, store.row_align)
            moments_len = padded_len(int(n_params), "float64", store.row_align)
            meta = {"format": FORMAT, "n_params": int(n_params), "max_rank": max_rank, "capacity": cap,
                    "row_len": row_len, "moments_len": moments_len, "dtype": str(np.dtype(dtype)), "model": model,
                    "checkpoint_every": int(max(1, min(checkpoint_every, cap // 2)))}
            store.create(LOG, (cap + 1, row_len), dtype)
            for name, shape, dt in ((COUNT, (1,), "int64"), (SHIFT, (int(n_params),), "float64"),
                                    (MOMENTS, (2, 2, moments_len), "float64"), (COMMIT, (2, 4), "int64")):
                store.create(name, shape, dt)
            post = cls(store, meta, readonly=False)
            post._checkpoint()
            raw = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
            store.create(META, raw.shape, "uint8")  # written last: its presence marks a whole posterior
            store.write_rows(META, 0, raw)
            store.persist(META)
        except BaseException:
            store.unlock(LOG)
            raise
        return post

    @classmethod
    def open(cls, store: Store, n_params: int | None = None, model: str | None = None,
             readonly: bool = False) -> "SWAGPosterior":
        """Reopen the posterior `store` holds, recovering any updates made after its last checkpoint."""
        if META not in store:
            raise PosteriorError(f"{store.describe()} holds no posterior (no {META}); check the path, "
                                 "or create one with SWAGPosterior.create / nvmlib train")
        meta = json.loads(store.read_rows(META, 0, store.shape(META)[0]).tobytes())
        if meta.get("format") != FORMAT:
            raise PosteriorError(f"posterior format {meta.get('format')} is not {FORMAT}; "
                                 "it was written by another nvmlib version")
        if n_params is not None and meta["n_params"] != n_params:
            raise PosteriorError(f"the posterior on {store.describe()} was made for {meta['n_params']} "
                                 f"parameters, not {n_params}: it belongs to another model "
                                 f"({meta.get('model') or 'unnamed'}); open the right path")
        if model is not None and (meta.get("model") or model).split("#")[0] != model:  # name#architecture
            raise PosteriorError(f"the posterior on {store.describe()} was made for model "
                                 f"{meta['model']!r}, not {model!r}; open the right path")
        if not readonly:
            store.lock(LOG)
        post = cls(store, meta, readonly)
        try:
            post._recover(int(store.read_rows(COUNT, 0, 1)[0]))
        except BaseException:
            if not readonly:
                store.unlock(LOG)
            raise
        return post

    # ---- properties ---------------------------------------------------------------------
    @property
    def n_collected(self) -> int:
        """Iterates seen so far."""
        self._settle()
        return self._count

    @property
    def rank(self) -> int:
        """Rows kept for the low-rank part (K)."""
        self._settle()
        return min(self._count, self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes the posterior occupies on its tier."""
        return sum(self.store.nbytes(n) for n in (META, LOG, COUNT, SHIFT, MOMENTS, COMMIT))

    def __repr__(self) -> str:
        return (f"<SWAGPosterior n_params={self.n_params} n_collected={self._count} rank={self.rank} "
                f"max_rank={self.max_rank} on {self.store.describe()}>")

    # ---- collecting ---------------------------------------------------------------------
    def update(self, theta: Any) -> bool:
        """Record one iterate: append its row to the log and add it to the moments.

        The row is written on a pool thread; it is still in flight when update() returns, unless
        the update checkpoints, and settles at the next call (so writing the row overlaps the next
        training step). Returns True when this update also wrote a checkpoint: everything up to it
        is durable, a point training can resume from. A crash can lose only updates after the last
        checkpoint, and a reopen rebuilds a consistent posterior of the rows that reached the tier.
        """
        self._check_open(write=True)  # settles the previous update's row
        vec = _as_vector(theta, self.n_params)
        if self.max_rank is None and self._count >= self.capacity:
            raise PosteriorError(f"the log is full: it was created for {self.capacity} iterates; create "
                                 "the posterior with a larger capacity or a max_rank (ring)")
        row = self._row[:self.n_params]  # the moments are of what the tier stores: cast first
        if not moments.stage(vec, row):
            raise _not_finite(vec, self.dtype)
        # the row goes to the tier on a pool thread while the moments are added here
        self._pending = self._pool().submit(self.store.write_rows, LOG, self._count % self.slots,
                                            self._row[None, :])
        if self._count == 0:
            self._shift[:] = row
        self._accumulate(row)
        if self._count == 0 or self._count + 1 - self._ckpt_count >= self.checkpoint_every:
            self._settle()
            self._checkpoint()
            return True
        return False

    def updates_to_checkpoint(self) -> int:
        """How many more updates until one writes a checkpoint (1: the next one does)."""
        self._settle()
        return 1 if self._count == 0 else max(1, self.checkpoint_every - (self._count - self._ckpt_count))

    def _settle(self) -> None:
        """Wait for the row in flight; then count it, or undo its moments exactly if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
            if self._count == 0:
                self.store.write_rows(SHIFT, 0, self._shift)
                self.store.persist(SHIFT)
        except BaseException:
            self._recover(self._count)  # checkpoint + replay of the rows before it
            raise
        self._count += 1
        self.store.write_rows(COUNT, 0, np.array([self._count], dtype=np.int64))

    def _accumulate(self, row: np.ndarray) -> None:
        """Add `row` to the shifted moments; a large vector's second half on a pool thread (the
        kernel releases the GIL), as the pool's other thread mostly waits for the device."""
        if self.n_params < PARALLEL_MIN:
            return self._add(row, 0, self.n_params)
        half = self.n_params // 2
        other = self._pool().submit(self._add, row, half, self.n_params)
        self._add(row, 0, half)
        other.result()

    def _add(self, row: np.ndarray, a: int, b: int) -> None:
        moments.add(row[a:b], self._shift[a:b], self._s1[a:b], self._s2[a:b])

    def _pool(self) -> ThreadPoolExecutor:
        """Two threads: one writes the row to the tier, one adds half of it to the moments."""
        if self._io is None:
            self._io = ThreadPoolExecutor(2, thread_name_prefix="nvmlib-update")
        return self._io

    def flush(self) -> None:
        """Checkpoint now: everything collected so far becomes durable."""
        self._check_open(write=True)
        self._checkpoint()

    def _checkpoint(self) -> None:
        self.store.persist(LOG)
        self.store.persist(COUNT)
        seq = self._seq + 1
        slot = seq % 2
        crc = self._pool().submit(_crc, self._moments)  # zlib releases the GIL: overlaps the write
        self.store.write_rows(MOMENTS, slot, self._moments[None])
        self.store.persist(MOMENTS)
        head = np.array([seq, self._count, crc.result()], dtype=np.int64)
        record = np.append(head, _crc(head)).astype(np.int64)
        self.store.write_rows(COMMIT, slot, record[None])
        self.store.persist(COMMIT)
        self._seq, self._ckpt_count = seq, self._count

    def _recover(self, target: int) -> None:
        """Load the newest valid checkpoint at or before `target` updates and replay the log to it."""
        records = self.store.read_rows(COMMIT, 0, 2)
        valid = [r for r in records if r[0] > 0 and int(r[3]) == _crc(r[:3]) and r[1] <= target]
        for seq, count, crc_m, _ in sorted(valid, key=lambda r: -r[0]):
            block = self.store.read_rows(MOMENTS, int(seq) % 2, int(seq) % 2 + 1)[0]
            if _crc(block) != crc_m or target - count > self.capacity:
                continue
            self._moments[:] = block
            self._shift[:] = self.store.read_rows(SHIFT, 0, self.n_params)
            for start in range(int(count), target, 64):
                for row in self._iterates(start, min(start + 64, target)):
                    self._accumulate(row)
            self._count, self._seq, self._ckpt_count = target, int(seq), int(count)
            return
        raise PosteriorError(f"the posterior on {self.store.describe()} has no valid checkpoint from "
                             f"which its {target} updates can be rebuilt; it is damaged beyond recovery")

    def truncate(self, count: int) -> None:
        """Roll back to the first `count` updates (drops later ones), e.g. to resume training there.

        Count and moments roll back exactly. In a ring that has wrapped, the dropped rows took the
        slots of the oldest kept ones, so until collection passes the old count again (with the same
        iterates when training is deterministic, as `nvmlib train --resume` is on the CPU) up to
        (dropped − 1) of the kept rows are newer iterates of the same run.
        """
        self._check_open(write=True)
        if not 0 <= count <= self._count:
            raise ValueError(f"cannot truncate to {count} updates: the posterior has {self._count}")
        if count == self._count:
            return
        self._recover(count)
        self.store.write_rows(COUNT, 0, np.array([count], dtype=np.int64))
        self._checkpoint()

    # ---- the posterior ------------------------------------------------------------------
    def mean(self) -> np.ndarray:
        """θ̄, the SWA solution (float64)."""
        self._check_nonempty()
        return self._shift + self._s1 / self._count

    def variance(self) -> np.ndarray:
        """Σ_diag = E[θ²] − θ̄², clamped at 0 (float64)."""
        self._check_nonempty()
        m = self._s1 / self._count
        return np.maximum(self._s2 / self._count - m * m, 0.0)

    def sample(self, S: int, scale: float = 0.5, seed: int | None = None) -> np.ndarray:
        """S draws θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), (S, n_params) float32, in one pass over the log.

        D z₂ = Σ_rows (θ_k − θ̄) z₂ₖ is accumulated chunk by chunk while the next chunk is read.
        With fewer than 2 kept rows only the diagonal part is used.
        """
        self._check_nonempty()
        if S < 1:
            raise ValueError(f"S must be >= 1, not {S}")
        work = np.float64 if self.dtype == np.float64 else np.float32  # the log's precision
        mean = self.mean().astype(work)
        sigma = np.sqrt(self.variance()).astype(work)
        K = self.rank
        seed_z1, seed_z2 = np.random.SeedSequence(seed).spawn(2)

        def diagonal() -> np.ndarray:  # σ⊙z₁, drawn on a thread while the log streams past
            z1 = np.random.default_rng(seed_z1).standard_normal((S, self.n_params), dtype=work)
            z1 *= sigma
            return z1

        with ThreadPoolExecutor(1) as pool:
            chunks = self._stream(K) if K >= 2 else iter(())  # the first read starts now
            pending = pool.submit(diagonal)
            if K >= 2:
                z2 = torch.from_numpy(np.random.default_rng(seed_z2).standard_normal((K, S)).astype(work))
                acc = torch.zeros((S, self.n_params), dtype=z2.dtype)
                for start, rows in chunks:
                    rows = rows.astype(work, copy=False)
                    rows -= mean
                    acc.addmm_(z2[start:start + len(rows)].T, torch.from_numpy(rows))  # acc += z2ᵀ·rows
                acc /= math.sqrt(K - 1)
            out = pending.result()
        if K >= 2:
            out += acc.numpy()
        out *= math.sqrt(scale)
        out += mean
        return out.astype(np.float32, copy=False)

    def _spans(self, start: int, stop: int, step: int) -> list[tuple[int, int]]:
        """[a, b) slot ranges holding iterates start..stop−1 in order, each at most `step` rows."""
        spans, t = [], start
        while t < stop:
            a = t % self.slots
            b = min(a + stop - t, self.slots, a + step)
            spans.append((a, b))
            t += b - a
        return spans

    def _iterates(self, start: int, stop: int) -> np.ndarray:
        parts = [self.store.read_rows(LOG, a, b)[:, :self.n_params] for a, b in self._spans(start, stop, stop)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [np.empty((0, self.n_params), self.dtype)])

    def _stream(self, K: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) chunks of the K kept rows, each chunk read while the previous is used; the
        first read starts at once."""
        step = max(1, CHUNK_BYTES // (self.row_len * self.dtype.itemsize))
        spans = self._spans(self._count - K, self._count, step)
        buffers = [aligned_empty((min(step, K), self.row_len), self.dtype) for _ in range(min(2, len(spans)))]

        def read(i: int) -> np.ndarray:
            a, b = spans[i]
            return self.store.read_rows(LOG, a, b, out=buffers[i % 2][:b - a])[:, :self.n_params]

        pool = ThreadPoolExecutor(1)
        first = pool.submit(read, 0)

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            pending, start = first, 0
            try:
                for i in range(len(spans)):
                    rows = pending.result()
                    if i + 1 < len(spans):
                        pending = pool.submit(read, i + 1)
                    yield start, rows
                    start += len(rows)
            finally:
                pool.shutdown()

        return chunks()

    def iterates(self, start: int, stop: int) -> np.ndarray:
        """Iterates θ_start … θ_stop−1, (stop − start, n_params) in the log's dtype; only the kept
        ones (the last `rank`) can be read."""
        self._check_open()
        first = self._count - self.rank
        if not first <= start <= stop <= self._count:
            raise ValueError(f"iterates {start}..{stop} are not all kept: this posterior keeps "
                             f"{first}..{self._count} (max_rank={self.max_rank})")
        return self._iterates(start, stop)

    def kept_rows(self) -> np.ndarray:
        """The K kept iterates, oldest first: the raw Θ behind D."""
        self._check_nonempty()
        return self.iterates(self._count - self.rank, self._count)

    # ---- closing ------------------------------------------------------------------------
    def close(self) -> None:
        """Checkpoint, persist and release the writer lock. The store stays open."""
        if self._closed:
            return
        try:
            if not self.readonly:
                self._settle()
                self._checkpoint()
        finally:
            if not self.readonly:
                self.store.unlock(LOG)
            if self._io is not None:
                self._io.shutdown()
            self._closed = True

    def __enter__(self) -> "SWAGPosterior":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise PosteriorError("this posterior was closed; reopen it with SWAGPosterior.open(store)")
        if write and self.readonly:
            raise PosteriorError("this posterior was opened read-only; open it with readonly=False to write")
        self._settle()

    def _check_nonempty(self) -> None:
        self._settle()
        if self._count == 0:
            raise PosteriorError("the posterior holds no iterates yet: call update(θ) first")
