"""The SWAG posterior: a log of raw iterates on a memory tier, moments in DRAM, crash-safe.

Layout on the store (all arrays fixed-shape, so every tier can hold them):
  swag.meta     uint8: JSON (n_params, max_rank, capacity, the log's layout, moments_len, dtype,
                checkpoint_every, model, id: a random identity), a newline, its digest in hex
  swag.log      the iterates, a ring when max_rank is set (nvmlib.log): raw rows, one slot per
  (swag.index)  iterate, or (codec="delta-zstd"/"delta-lz4") compressed XOR-deltas of consecutive
                iterates with an index; the row being written never overwrites a kept one (a crash
                mid-write tears nothing kept), and every row carries a digest seeded with (id, t)
  swag.count    int64 (2,): [updates whose row is fully written, its digest]: an upper bound for
                replay, which also stops at the first row that does not verify as iterate t
  swag.shift    float64 (n_params,): the first iterate; moments are kept relative to it
  swag.moments  float64 (2, 2, moments_len): two checkpoint slots of [Σ(θ−θ₀), Σ(θ−θ₀)²]
                (n_params padded to 4 KiB, like the log's rows: one layout on every tier)
  swag.commit   int64 (2, 6): per slot [seq, count, digest of the slot's moments, digest of the
                shift, the posterior's identity, digest of the record]
Every digest (checksum.py: xxHash3) is seeded with the identity in swag.meta, so files of two
posteriors never mix. Durability order: an update's row, then its count; every `checkpoint_every`
updates the log and count are persisted, then the moments go to the older slot, then its commit
record. A torn record or slot fails its checksum and recovery falls back to the other one.
Recovery = newest valid checkpoint + replay of the rows appended after it that verify, up to the
count (checkpoint_every <= capacity / 2 keeps them in the log). A reader sees one snapshot: the
moments of a count n and rows it checks are iterates n−K..n−1 (SnapshotError once a running
writer has overwritten one of them: reopen for a newer snapshot).
"""
from __future__ import annotations

import json
import math
import numbers
import resource
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from nvmlib import moments
from nvmlib.backends.base import ALIGN, Store, aligned_empty, check_fits, padded_len
from nvmlib.checksum import digest, identity_seed, new_identity
from nvmlib.codec import check_codec
from nvmlib.errors import InputError, PosteriorError, SnapshotError, StoreError
from nvmlib.log import (ASSUMED_RATIO, INDEX, LOG, REPLAY_ROWS, Batch, Runs, layout, log_bytes,
                        log_class)

FORMAT = 3
SNAPSHOT_TRIES = 20  # a reader retries its snapshot this often while a writer keeps changing it
META, COUNT, SHIFT, MOMENTS, COMMIT = "swag.meta", "swag.count", "swag.shift", "swag.moments", "swag.commit"
NAMES = (META, LOG, INDEX, COUNT, SHIFT, MOMENTS, COMMIT)
FLOAT_DTYPES = ("float16", "float32", "float64")
T = TypeVar("T")
MAX_CHUNK = 32  # iterates per chunk of a compressed log (a keyframe, then deltas), at most
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


def _not_finite(vec: np.ndarray, dtype: np.dtype) -> InputError:
    """The error for a θ that has NaN/Inf values, or values its posterior's dtype cannot hold."""
    bad = ~np.isfinite(vec)
    if bad.any():
        return InputError(f"θ has {int(bad.sum())} NaN/Inf values (first at index {int(np.flatnonzero(bad)[0])}); "
                          "training diverged: lower the learning rate. The posterior was not changed")
    return InputError(f"θ overflows {dtype} (|θ| up to {np.abs(vec).max():.3g}); "
                      "store the posterior as float32 or float64. The posterior was not changed")


def chunk_for(capacity: int) -> int:
    """Iterates per chunk of a compressed log keeping `capacity`: long chunks store fewer keyframes,
    short ones keep (and decode) fewer iterates beyond the kept ones; a quarter of them, 2 to MAX_CHUNK."""
    return int(min(MAX_CHUNK, max(2, capacity // 4)))


def check_sampling(S: Any, scale: Any) -> tuple[int, float]:
    """(S, scale) as int and float (numpy scalars welcome), or an InputError naming the bad one:
    every layer that draws from a posterior checks its arguments here."""
    if isinstance(S, bool) or not isinstance(S, numbers.Integral) or S < 1:
        raise InputError(f"S={S!r}: the number of draws must be an integer >= 1 (e.g. 30)")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise InputError(f"scale={scale!r}: the covariance scale must be a finite number >= 0 "
                         "(0.5 in Maddox et al.)")
    return int(S), float(scale)


def _encode_meta(meta: dict) -> np.ndarray:
    body = json.dumps(meta).encode()
    return np.frombuffer(body + b"\n" + f"{digest(body):016x}".encode(), dtype=np.uint8)


def read_meta(store: Store) -> dict:
    """The verified meta of the posterior on `store`; PosteriorError saying what is wrong."""
    if META not in store:
        raise PosteriorError(f"{store.describe()} holds no posterior (no {META}); check the path, "
                             "or create one with SWAGPosterior.create / nvmlib train")
    raw = store.read_rows(META, 0, store.shape(META)[0]).tobytes()
    if not raw.strip(b"\0"):
        raise PosteriorError(f"{store.describe()} holds an incomplete posterior: its creation was interrupted "
                             f"before {META} was written; create it again (overwrite=True, train: --overwrite)")
    body, _, tail = raw.rpartition(b"\n")
    try:
        old = json.loads(raw)
    except ValueError:
        old = None
    if isinstance(old, dict) and old.get("format") != FORMAT:
        raise PosteriorError(f"the posterior on {store.describe()} has format {old.get('format')}, written by an "
                             f"older nvmlib; this version reads format {FORMAT} (checksummed) only: collect it "
                             "again, or read it with the nvmlib version that wrote it")
    try:
        meta = json.loads(body)
        ok = isinstance(meta, dict) and int(tail, 16) == digest(body)
    except ValueError:
        ok = False
    if not ok:
        raise PosteriorError(f"{META} on {store.describe()} fails its checksum: the posterior's description was torn "
                             "by an interrupted create, or damaged or edited since; it cannot be trusted (restore it "
                             "from a copy, or create it again with overwrite=True)")
    if meta.get("format") != FORMAT:
        raise PosteriorError(f"posterior format {meta.get('format')} is not {FORMAT}; "
                             "it was written by another nvmlib version")
    return meta


def _check_file_size_limit(store: Store, name: str, nbytes: int) -> None:
    """Refuse, before anything is deleted, a file larger than this process may write (ulimit -f)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if store.path is not None and store.path.is_dir() and soft != resource.RLIM_INFINITY and nbytes + ALIGN > soft:
        raise StoreError(f"the posterior's {name} needs a file of {(nbytes + ALIGN) / 1e9:.3f} GB but this process "
                         f"may write files of at most {soft / 1e9:.3f} GB (ulimit -f); raise the limit or keep "
                         "fewer iterates (smaller max_rank / -K). Nothing was changed")


def draw(S: int, scale: float, seed: int | None, mean: np.ndarray, variance: np.ndarray, K: int, work: type,
         low_rank: Callable[[torch.Tensor, np.ndarray], torch.Tensor]) -> np.ndarray:
    """S draws θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), (S, n) float32: z₁ (S, n) and z₂ (K, S) come from
    `seed` alone, so posteriors of the same iterates (one log, or the shards of one run) draw the same
    models; low_rank(z2, θ̄) gives Σ_k z₂ₖ (θ_k − θ̄) and runs while σ⊙z₁ is drawn on a thread."""
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


class SWAGPosterior:
    """SWAG: N(θ̄, scale·(Σ_diag + D Dᵀ/(K−1))) from iterates kept on a memory tier."""

    def __init__(self, store: Store, meta: dict, readonly: bool) -> None:
        self.store = store
        self.meta = meta
        self.n_params: int = meta["n_params"]
        self.max_rank: int | None = meta["max_rank"]
        self.capacity: int = meta["capacity"]
        self.dtype = np.dtype(meta["dtype"])
        self.checkpoint_every: int = meta["checkpoint_every"]
        self.readonly = readonly
        self._ident = identity_seed(meta["id"])
        self._count = 0
        self._seq = 0
        self._ckpt_count = 0
        self._moments = aligned_empty((2, meta["moments_len"]), np.float64)  # the checkpoint block
        self._moments[:] = 0
        self._s1, self._s2 = self._moments[0, :self.n_params], self._moments[1, :self.n_params]
        self._shift = np.zeros(self.n_params)
        self.log = log_class(meta)(store, meta, self._ident)
        self._io: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # the write of row self._count, while in flight
        self._closed = False

    # ---- creating and opening -----------------------------------------------------------
    @staticmethod
    def required_bytes(n_params: int, rows: int, dtype: str = "float32", codec: str | None = None,
                       grows: bool = False) -> int:
        """Bytes a posterior of `rows` kept iterates needs on a tier (the log has room for the next
        row, a compressed log for a chunk more): a compressed log's records counted at
        log.ASSUMED_RATIO of raw rows where the tier grows (Store.grows), else at their worst
        case."""
        log = log_bytes({"n_params": n_params, "capacity": rows, "dtype": dtype,
                         **layout(n_params, rows, dtype, codec, chunk_for(rows))}, grows)
        return log + (4 * padded_len(n_params, "float64", ALIGN) + n_params) * 8 + 8 * 4096

    @classmethod
    def create(cls, store: Store, n_params: int, max_rank: int | None = None, dtype: str = "float32",
               checkpoint_every: int = 100, capacity: int | None = None, model: str | None = None,
               overwrite: bool = False, codec: str | None = None) -> "SWAGPosterior":
        """A new, empty posterior on `store`. max_rank=None keeps every iterate (up to `capacity`).

        codec: None keeps raw rows; "delta-zstd" or "delta-lz4" stores each iterate as the
        compressed XOR with the one before it (lossless: every row reads back bit-exact), in chunks
        that each start with a keyframe (chunk_for: a quarter of the kept iterates, 2 to MAX_CHUNK).

        overwrite=True replaces a posterior already there, but only after every check the new one
        must pass (arguments, free space, the file size limit): a refused create deletes nothing."""
        if not isinstance(n_params, (int, np.integer)) or isinstance(n_params, bool) or n_params < 1:
            raise InputError(f"n_params must be a positive integer, not {n_params!r}")
        for name, value in (("max_rank", max_rank), ("capacity", capacity), ("checkpoint_every", checkpoint_every)):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
                raise InputError(f"{name} must be an integer, not {value!r}")
        if max_rank is not None and max_rank < 2:
            raise InputError(f"max_rank={max_rank}: the low-rank part needs at least 2 iterates "
                             "(K−1 divides D Dᵀ); use max_rank >= 2 or None to keep all")
        try:
            dtype = str(np.dtype(dtype))
        except TypeError:
            dtype = repr(dtype)
        if dtype not in FLOAT_DTYPES:
            raise InputError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        if max_rank is None and capacity is None:
            raise InputError("max_rank=None keeps every iterate: pass capacity=<number of updates> "
                             "so the tier can reserve the log (nvmlib train computes it)")
        cap = int(max_rank if max_rank is not None else capacity)
        if cap < 2:
            raise InputError(f"capacity={cap}: a posterior needs room for at least 2 iterates")
        if checkpoint_every < 1:
            raise InputError(f"checkpoint_every must be >= 1, not {checkpoint_every}")
        check_codec(codec)
        store.lock(LOG)
        try:
            if META in store:
                try:
                    read_meta(store)
                    whole = True
                except PosteriorError as exc:
                    whole = "incomplete" not in str(exc)  # a torn create holds nothing to keep
                if whole and not overwrite:
                    raise PosteriorError(f"{store.describe()} already holds a posterior; open it with "
                                         "SWAGPosterior.open, pass overwrite=True (train: --overwrite), "
                                         "or choose another path")
            old = [n for n in NAMES if n in store]  # or a torn create's
            moments_len = padded_len(int(n_params), "float64", ALIGN)
            room = "" if codec is None else (
                f", {codec} at {ASSUMED_RATIO}x less than raw rows" if store.grows else
                f", {codec} with room for incompressible rows: {store.describe()} does not grow")
            check_fits(store, cls.required_bytes(int(n_params), cap, dtype, codec, store.grows),
                       f"a posterior of {cap} iterates × {n_params} parameters ({dtype}{room})",
                       reclaimable=sum(store.occupied(n) for n in old))
            meta = {"format": FORMAT, "n_params": int(n_params), "max_rank": max_rank, "capacity": cap,
                    **layout(int(n_params), cap, dtype, codec, chunk_for(cap)),
                    "moments_len": moments_len, "dtype": dtype, "model": model,
                    "checkpoint_every": int(max(1, min(checkpoint_every, cap // 2))), "id": new_identity()}
            arrays = {**log_class(meta).arrays(meta), COUNT: ((2,), "int64"), SHIFT: ((int(n_params),), "float64"),
                      MOMENTS: ((2, 2, moments_len), "float64"), COMMIT: ((2, 6), "int64")}
            for name, (shape, dt) in arrays.items():
                _check_file_size_limit(store, name, int(np.prod(shape)) * np.dtype(dt).itemsize)
            for name in old:
                store.delete(name)
            for name, (shape, dt) in arrays.items():
                store.create(name, shape, dt, sparse=name in log_class(meta).SPARSE)
            post = cls(store, meta, readonly=False)
            post._checkpoint(force=True)
            raw = _encode_meta(meta)
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
        """Reopen the posterior `store` holds, recovering any updates made after its last checkpoint.

        readonly=True: a reader; it sees one consistent snapshot even while a writer collects."""
        meta = read_meta(store)
        if n_params is not None and meta["n_params"] != n_params:
            raise PosteriorError(f"the posterior on {store.describe()} was made for {meta['n_params']} "
                                 f"parameters, not {n_params}: it belongs to another model "
                                 f"({meta.get('model') or 'unnamed'}); open the right path")
        if model is not None and (meta.get("model") or model).split("#")[0] != model:  # name#architecture
            raise PosteriorError(f"the posterior on {store.describe()} was made for model "
                                 f"{meta['model']!r}, not {model!r}; open the right path")
        if not readonly:
            if store.readonly:
                raise PosteriorError(f"{store.describe()} was opened read-only: open the posterior with readonly=True, "
                                     "or open the store for writing")
            store.lock(LOG)
        post = cls(store, meta, readonly)
        try:
            post._check_shapes()
            post._open_snapshot()
        except BaseException:
            if not readonly:
                store.unlock(LOG)
            raise
        return post

    def _check_shapes(self) -> None:
        """Every array has the shape its meta says (a swapped or resized file is refused)."""
        want = {**{name: shape for name, (shape, _) in self.log.arrays(self.meta).items()}, COUNT: (2,),
                SHIFT: (self.n_params,), MOMENTS: (2, 2, self.meta["moments_len"]), COMMIT: (2, 6)}
        for name, shape in want.items():
            if name not in self.store:
                raise PosteriorError(f"{self.store.describe()} lacks {name}: the posterior is damaged")
            if self.store.shape(name) != shape:
                raise PosteriorError(f"{name} on {self.store.describe()} has shape {self.store.shape(name)}, "
                                     f"not {shape} as {META} says: the posterior is damaged")

    def _read_count(self) -> int | None:
        """The count the log's writer last recorded, or None when it fails its checksum (torn, edited)."""
        count, check = (int(x) for x in self.store.read_rows(COUNT, 0, 2))
        return count if check == digest(np.array([count], np.int64), self._ident) and count >= 0 else None

    def _open_snapshot(self) -> None:
        """Recover the newest state; a reader retries while a running writer changes what it reads."""
        for attempt in range(SNAPSHOT_TRIES if self.readonly else 1):
            before = (self.store.read_rows(COUNT, 0, 2).tobytes(), self.store.read_rows(COMMIT, 0, 2).tobytes())
            try:
                self._recover(self._read_count(), exact=False)
                break
            except PosteriorError:
                after = (self.store.read_rows(COUNT, 0, 2).tobytes(), self.store.read_rows(COMMIT, 0, 2).tobytes())
                if not self.readonly or (after == before and attempt > 0) or attempt + 1 == SNAPSHOT_TRIES:
                    raise
        if not self.readonly:  # rows the crash left beyond the recovered count (e.g. the one in flight)
            self._discard(self._count, max(self._read_count() or 0, self._count) + 2)

    def refresh(self) -> None:
        """A reader: move to the newest snapshot the writer has made durable (n_collected, mean,
        variance and kept rows all of it); unchanged if that fails. A writer: nothing to do."""
        self._check_open()
        if self.readonly:
            with self._unchanged_on_error():
                self._open_snapshot()

    def _reading(self, read: Callable[[], T]) -> T:
        """`read()`; for a reader whose rows a running writer overwrote meanwhile, again on a newer
        snapshot (refresh), up to SNAPSHOT_TRIES times, so that a reader never has to catch and reopen."""
        for attempt in range(SNAPSHOT_TRIES if self.readonly else 1):
            try:
                return read()
            except SnapshotError:
                if attempt + 1 >= SNAPSHOT_TRIES or not self.readonly:
                    raise
                self.refresh()
        raise AssertionError("unreachable")

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
        """Bytes the posterior occupies on its tier now (its files' blocks, what `du` counts,
        where the tier can tell): a compressed log's grow with its records on a tier that grows."""
        self._settle()
        return sum(self.store.occupied(n) for n in NAMES if n in self.store)

    @property
    def stored_bytes(self) -> int:
        """The same as nbytes (a compressed log occupies what it stores); the records alone:
        `post.log.stored_bytes(first, stop)`."""
        return self.nbytes

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
        row = self.log.row  # the moments are of what the tier stores: cast first
        if not moments.stage(vec, row):
            raise _not_finite(vec, self.dtype)
        # the row is stamped (or encoded) and goes to the tier on a pool thread while the moments are added here
        self._pending = self._pool().submit(self.log.write, self._count)
        if self._count == 0:
            self._shift[:] = row
        self._accumulate(row)
        if self._count == 0 or self._count + 1 - self._ckpt_count >= self.checkpoint_every:
            self._settle()
            try:
                self._checkpoint()
            except BaseException:
                self._uncount()
                raise
            return True
        return False

    def _uncount(self) -> None:
        """Undo the last update after its checkpoint failed (a full disk): the live state, the count on
        the tier and the row go back to the update before, so a retry records the iterate once."""
        count = self._count - 1
        for slot, record in enumerate(self.store.read_rows(COMMIT, 0, 2)):
            if record[1] > count:  # written, though its persist failed: no record may outlive its update
                self.store.write_rows(COMMIT, slot, np.zeros((1, 6), np.int64))
        self._roll_back(count)
        self._discard(count, count + 1)
        self._write_count(count)

    def updates_to_checkpoint(self) -> int:
        """How many more updates until one writes a checkpoint (1: the next one does)."""
        self._settle()
        return 1 if self._count == 0 else max(1, self.checkpoint_every - (self._count - self._ckpt_count))

    def _write_count(self, count: int) -> None:
        value = np.array([count], np.int64)
        self.store.write_rows(COUNT, 0, np.append(value, digest(value, self._ident)).astype(np.int64))

    def _settle(self) -> None:
        """Wait for the row in flight; then count it, or undo its moments exactly if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
            self.log.order()  # the row, then the count that covers it
            if self._count == 0:
                self.store.write_rows(SHIFT, 0, self._shift)
                self.store.persist(SHIFT)
        except BaseException as exc:
            self._recover(self._count, exact=True)  # checkpoint + replay of the rows before it
            if isinstance(exc, StoreError):  # the row was written behind the update() call that gave it
                raise StoreError(f"{exc}. Iterate {self._count}, given to the last update() call, was not "
                                 f"recorded: n_collected stays {self._count}; record it again") from exc
            raise
        self._count += 1
        self._write_count(self._count)

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

    def _checkpoint(self, force: bool = False) -> None:
        """Persist log and count, then the moments into the older slot, then its commit record.
        Without `force`, a count already checkpointed is not written again: the other slot keeps
        the checkpoint before it (the one a saved train state may point to)."""
        if not force and self._count == self._ckpt_count:
            return
        self.log.persist()
        self.store.persist(COUNT)
        seq = self._seq + 1
        slot = seq % 2
        check = self._pool().submit(digest, self._moments, self._ident)  # overlaps the write
        self.store.write_rows(MOMENTS, slot, self._moments[None])
        self.store.persist(MOMENTS)
        head = np.array([seq, self._count, check.result(), digest(self._shift, self._ident), self._ident],
                        dtype=np.int64)
        record = np.append(head, digest(head, self._ident)).astype(np.int64)
        self.store.write_rows(COMMIT, slot, record[None])
        self.store.persist(COMMIT)
        self._seq, self._ckpt_count = seq, self._count

    def _checkpoints(self, bound: int | None, problems: list[str]) -> list[tuple[int, int, int, int]]:
        """(seq, count, moments digest, shift digest) of the valid commit records, newest first,
        at or before `bound` (None: any); what is wrong with the others goes to `problems`."""
        valid = []
        for slot, r in enumerate(self.store.read_rows(COMMIT, 0, 2)):
            seq, count, d_moments, d_shift, ident, check = (int(x) for x in r)
            if seq == 0 and not r.any():
                continue  # never written
            if ident != self._ident:
                problems.append(f"{COMMIT} slot {slot} belongs to another posterior (identity {ident:x}, "
                                f"not {self._ident:x}): files of two posteriors were mixed")
            elif check != digest(r[:5], self._ident) or seq < 1 or count < 0 or seq % 2 != slot:
                problems.append(f"{COMMIT} slot {slot} fails its checksum (a torn or damaged record)")
            elif bound is None or count <= bound:
                valid.append((seq, count, d_moments, d_shift))
        return sorted(valid, reverse=True)

    def _recover(self, bound: int | None, exact: bool) -> None:
        """Load the newest valid checkpoint at or before `bound` updates and replay the log's
        verified rows after it: up to `bound` (None: the newest checkpoint's count) or, unless
        `exact`, the first row that does not verify (a crash lost it). Every update of that
        checkpoint is present, or PosteriorError says what is damaged."""
        problems: list[str] = []
        candidates = self._checkpoints(bound, problems)
        if bound is None:
            bound = max((c[1] for c in candidates), default=0)
            candidates = [c for c in candidates if c[1] <= bound]
        if exact:  # the empty posterior: an exact start when rows 0..bound-1 are all still in the log
            candidates.append((0, 0, digest(np.zeros_like(self._moments), self._ident), -1))
        for seq, count, d_moments, d_shift in candidates:
            block = self.store.read_rows(MOMENTS, seq % 2, seq % 2 + 1)[0] if seq else np.zeros_like(self._moments)
            if digest(block, self._ident) != d_moments:
                problems.append(f"{MOMENTS} slot {seq % 2} fails its checksum (checkpoint at {count} updates)")
                continue
            shift = self.store.read_rows(SHIFT, 0, self.n_params)
            if count > 0 and digest(shift, self._ident) != d_shift:
                problems.append(f"{SHIFT} fails its checksum: the first iterate, which every moment is relative "
                                "to, is damaged")
                continue
            self._moments[:] = block
            self._shift[:] = shift
            reached = self._replay(count, bound, problems)
            if reached < bound and (exact or reached < count):
                continue
            if count == 0 and reached > 0 and not self.readonly and self._shift.tobytes() != shift.tobytes():
                self.store.write_rows(SHIFT, 0, self._shift)
                self.store.persist(SHIFT)
            newest = max((c[0] for c in self._checkpoints(None, [])), default=0)
            self._count, self._seq, self._ckpt_count = reached, seq or newest, count
            return
        what = "; ".join(dict.fromkeys(problems)) or "no commit record was ever written"
        raise PosteriorError(f"the posterior on {self.store.describe()} cannot be rebuilt to {bound} updates "
                             f"from a valid checkpoint: {what}. It is damaged beyond recovery")

    def _replay(self, start: int, stop: int, problems: list[str]) -> int:
        """Add the log's rows of iterates start..stop−1 to the moments until one fails to verify; the
        count reached. A reader whose rows a running writer overwrote gets SnapshotError."""
        reached = start
        for first, rows, ok, why in self.log.stream([(start, stop)], REPLAY_ROWS * self.n_params * self.dtype.itemsize):
            for i in range(ok):
                if first + i == 0:
                    self._shift[:] = rows[0]
                self._accumulate(rows[i])
            reached = first + ok
            if why:
                if self.readonly and "overwritten" in why:
                    raise SnapshotError(why)
                problems.append(why)
                return reached
        return stop

    def _discard(self, start: int, stop: int) -> None:
        """Invalidate the rows of iterates start..stop−1 still in the log (a truncate dropped them,
        or a crash left them beyond the recovered count), so that no later replay takes them for
        new ones; persisted before the count or checkpoint that relies on it."""
        if self.log.discard(start, stop):
            self.log.persist()

    def _roll_back(self, count: int) -> None:
        """Make the live state the posterior after `count` (<= now) updates: the empty one, or a checkpoint
        plus replay. Refused (PosteriorError) when the log no longer holds what that needs; the live
        moments, shift and counters are then exactly as they were."""
        with self._unchanged_on_error():
            if count == 0:
                self._moments[:] = 0
                self._shift[:] = 0
                self._count = 0
            else:
                self._recover(count, exact=True)

    @contextmanager
    def _unchanged_on_error(self) -> Iterator[None]:
        """Restore the live moments, shift and counters if the block raises (a refused call changes nothing)."""
        saved = (self._moments.copy(), self._shift.copy(), self._count, self._seq, self._ckpt_count)
        try:
            yield
        except BaseException:
            self._moments[:], self._shift[:] = saved[0], saved[1]
            self._count, self._seq, self._ckpt_count = saved[2:]
            raise

    def truncate(self, count: int) -> None:
        """Roll back to the first `count` updates (drops later ones), e.g. to resume training there.

        Count and moments roll back exactly. In a ring that has wrapped, the dropped rows took the
        slots of the oldest kept ones: until collection passes the old count again, reading those
        rows (kept_rows, sample) raises PosteriorError rather than return iterates of another run.
        """
        self._check_open(write=True)
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool):
            raise InputError(f"truncate needs a whole number of updates, not {count!r}")
        if not 0 <= count <= self._count:
            raise InputError(f"cannot truncate to {count} updates: the posterior has {self._count}")
        if count == self._count:
            return
        old = self._count
        try:
            self._roll_back(int(count))
        except PosteriorError:
            first = self._count - self.rank
            usable = [c[1] for c in self._checkpoints(old, []) if c[1] >= first]
            can = f"0, or any count from {min(usable)} to {old}" if usable else "0"
            raise PosteriorError(
                f"cannot truncate to {count} updates: that state needs a checkpoint at or before {count} and "
                f"every iterate after it, but the ring (max_rank={self.max_rank}) keeps only iterates "
                f"{first}..{old - 1} and no checkpoint at or before {count} is among them (or a row after it "
                f"fails its checksum). This posterior can be truncated to {can}. Nothing was changed") from None
        self._discard(int(count), old)
        self._write_count(int(count))
        self._checkpoint(force=True)
        self._checkpoint(force=True)  # both slots now hold this count: no record of the dropped updates is left

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

    def sample(self, S: int, scale: float = 0.5, seed: int | None = None, executor: Any = None) -> np.ndarray:
        """S draws θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), (S, n_params) float32, in one pass over the log.

        With fewer than 2 kept rows only the diagonal part is used. executor: an object whose
        low_rank(posterior, z2, mean) computes D z₂ elsewhere (nvmlib.dask.DaskExecutor: where the zarr
        log lies); the same array as without one, to float32 rounding. A reader overtaken
        by a running writer draws again from a newer snapshot (refresh): the draws belong to the
        snapshot that n_collected, mean() and variance() show once this returns."""
        S, scale = check_sampling(S, scale)
        return self._reading(lambda: self._draw(S, scale, seed, executor))

    def _draw(self, S: int, scale: float = 0.5, seed: int | None = None, executor: Any = None) -> np.ndarray:
        """sample() on the snapshot held, D z₂ from low_rank here or from the executor."""
        self._check_nonempty()
        low_rank = self.low_rank if executor is None else \
            lambda z2, mean: torch.from_numpy(executor.low_rank(self, z2.numpy(), mean))
        return draw(S, scale, seed, self.mean(), self.variance(), self.rank, self.work_dtype, low_rank)

    @property
    def work_dtype(self) -> type:
        """The precision samples are computed in: the log's (float64 for a float64 log, else float32)."""
        return np.float64 if self.dtype == np.float64 else np.float32

    def low_rank(self, z2: torch.Tensor, mean: np.ndarray) -> torch.Tensor:
        """Σ_k z₂ₖ (θ_k − θ̄) over the K kept rows, (S, n_params) in z2's dtype, from one streamed
        pass over the log (z2: (K, S); mean: θ̄ in that dtype)."""
        self._check_nonempty()
        K = self.rank
        acc = torch.zeros((z2.shape[1], self.n_params), dtype=z2.dtype)
        for t, rows in self._stream([(self._count - K, self._count)]):
            rows = rows.astype(mean.dtype, copy=False)
            rows -= mean
            start = t - (self._count - K)
            acc.addmm_(z2[start:start + len(rows)].T, torch.from_numpy(rows))  # acc += z2ᵀ·rows
        return acc

    @classmethod
    def view(cls, store: Store, meta: dict, count: int) -> "SWAGPosterior":
        """A read-only view of the log as it stood after `count` updates, without moments or
        recovery: for a process that only reads kept rows (a dask worker, nvmlib.dask)."""
        post = cls(store, meta, readonly=True)
        post._count = count
        return post

    def _checked(self, batch: Batch) -> tuple[int, np.ndarray]:
        """A streamed batch's (first iterate, rows), once all its rows verify."""
        first, rows, ok, why = batch
        if ok < len(rows) or why:
            raise (SnapshotError(why + "; reopen the posterior for a newer snapshot") if self._overtaken(why)
                   else PosteriorError(why + f"; mean and variance are intact, but iterates {self._count - self.rank}.."
                                       f"{self._count} (sample, kept_rows) cannot be trusted"))
        return first, rows

    def _overtaken(self, why: str) -> bool:
        """Whether a row failed because a running writer moved past this reader's snapshot: the row
        holds a newer iterate, or the writer's count has advanced since (so the row may have been
        read while it was being overwritten, torn) and not because it is damaged."""
        if "overwritten" in why:
            return True
        if not self.readonly:
            return False
        now = self._read_count()
        return now is None or now > self._count

    def _stream(self, runs: Runs) -> Iterator[tuple[int, np.ndarray]]:
        """(first iterate, rows) batches of the iterates of `runs` ([t0, t1) ranges, in this order),
        each read while the previous one is used (the first read starts at once);
        SnapshotError/PosteriorError at a row that does not verify."""
        return (self._checked(batch) for batch in self.log.stream(runs))

    def iterates(self, start: int, stop: int) -> np.ndarray:
        """Iterates θ_start … θ_stop−1, (stop − start, n_params) in the log's dtype; only the kept
        ones (the last `rank`) can be read."""
        self._check_open()
        first = self._count - self.rank
        if not first <= start <= stop <= self._count:
            raise ValueError(f"iterates {start}..{stop} are not all kept: this posterior keeps "
                             f"{first}..{self._count} (max_rank={self.max_rank})")
        out = np.empty((stop - start, self.n_params), self.dtype)
        for t, rows in self._stream([(start, stop)]):
            out[t - start:t - start + len(rows)] = rows
        return out

    def kept_rows(self) -> np.ndarray:
        """The K kept iterates, oldest first: the raw Θ behind D. A reader overtaken by a running writer
        reads them again from a newer snapshot (refresh): they are those of n_collected once this returns."""
        self._check_nonempty()
        return self._reading(lambda: self.iterates(self._count - self.rank, self._count))

    # ---- closing ------------------------------------------------------------------------
    def close(self) -> None:
        """Checkpoint, persist, publish the log (plain zarr then reads what nvmlib reads) and release
        the writer lock. The store stays open."""
        if self._closed:
            return
        try:
            if not self.readonly:
                self._settle()
                self._checkpoint()  # nothing when this count is already checkpointed
                for name in self.log.arrays(self.meta):
                    self.store.publish(name)
        finally:
            if not self.readonly:
                self.store.unlock(LOG)
            if self._io is not None:
                self._io.shutdown()
            self.log.close()
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
        self._check_open()
        if self._count == 0:
            raise PosteriorError("the posterior holds no iterates yet: call update(θ) first")
