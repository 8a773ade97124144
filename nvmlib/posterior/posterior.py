"""The SWAG posterior: a log of iterates on a memory tier, moments in DRAM, crash-safe.

This class is the façade over its floor: the arrays and meta (layout), the log of kept iterates
(log: raw rows or compressed records), the running sums (moments.Moments), the count, checkpoints
and recovery (journal.Journal) and the sampling formula (sampling). Every row carries a digest
seeded with (id, t); the row being written never overwrites a kept one (a crash mid-write tears
nothing kept). A reader sees one snapshot: the moments of a count n and rows it checks are
iterates n−K..n−1 (SnapshotError once a running writer has overwritten one of them; sample and
kept_rows then move to a newer snapshot by themselves).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import psutil
import torch

import nvmlib.posterior.layout as layout
import nvmlib.posterior.moments as moments
from nvmlib.backends import open_store
from nvmlib.backends.base import Store, check_fits
from nvmlib.errors import InputError, PosteriorError, SnapshotError, StoreError
from nvmlib.posterior.checksum import identity_seed
from nvmlib.posterior.journal import Journal, started_pool
from nvmlib.posterior.layout import META, NAMES, read_meta
from nvmlib.posterior.log import ASSUMED_RATIO, LOG, Batch, Runs, log_class, staged_rows
from nvmlib.posterior.moments import warm
from nvmlib.posterior.moments_store import StoreMoments
from nvmlib.posterior.moments_torch import TorchMoments
from nvmlib.posterior.sampling import (
    DRAWS,
    SHAPE,
    Draws,
    Sink,
    check_sampling,
    draw,
    draw_blocks,
    low_rank,
    running,
)

SNAPSHOT_TRIES = 20  # a reader retries its snapshot this often while a writer keeps changing it
T = TypeVar("T")


def _as_vector(theta: Any, n_params: int) -> np.ndarray:
    """θ as a 1-D float numpy array of n_params, or a ValueError/TypeError that says what is
    wrong."""
    if hasattr(theta, "detach"):  # torch tensor, CPU or CUDA
        theta = theta.detach().to("cpu").numpy()
    arr = np.asarray(theta)
    if arr.dtype.kind not in "f":
        raise TypeError(
            f"θ has dtype {arr.dtype}; parameters must be floating point "
            "(float16/32/64): pass the model's flat parameter vector"
        )
    if arr.shape != (n_params,):
        raise ValueError(
            f"θ has shape {arr.shape} but this posterior holds {n_params} parameters: "
            f"pass a 1-D vector of length {n_params} (flatten the model's parameters)"
        )
    return arr


def _not_finite(vec: np.ndarray, dtype: np.dtype) -> InputError:
    """The error for a θ that has NaN/Inf values, or values its posterior's dtype cannot hold."""
    bad = ~np.isfinite(vec)
    if bad.any():
        return InputError(
            f"θ has {int(bad.sum())} NaN/Inf values (first at index "
            f"{int(np.flatnonzero(bad)[0])}); training diverged: lower the learning "
            "rate. The posterior was not changed"
        )
    return InputError(
        f"θ overflows {dtype} (|θ| up to {np.abs(vec).max():.3g}); "
        "store the posterior as float32 or float64. The posterior was not changed"
    )


MOMENTS_KINDS = ("auto", "host", "device", "store")
# "auto" keeps a writer's moments on its tier when in RAM (the sums, θ₀ and a checkpoint's copy:
# HOST_BYTES a parameter) they would take more than this fraction of the memory available
AUTO_STORE_FRACTION = 0.5
HOST_BYTES = 40


def _check_moments(kind: Any, device: Any) -> None:
    """Refuse, before anything is written, moments that cannot be placed."""
    if kind not in MOMENTS_KINDS:
        raise InputError(f"moments={kind!r} is not one of {', '.join(MOMENTS_KINDS)}")
    if kind == "device" and device is None:
        raise InputError(
            'moments="device" keeps the sums on a torch device: pass device= '
            '(the model\'s, e.g. "cuda:0")'
        )


def _moments_kind(kind: str, n_params: int, readonly: bool, store: Store) -> str:
    """Where the sums of a posterior opened so go: `kind`, "auto" resolved (the tier when they do
    not fit in RAM: AUTO_STORE_FRACTION), and a reader's in RAM (it writes nothing)."""
    if readonly:
        return "host" if kind in ("auto", "store") else kind
    if kind != "auto":
        return kind
    available = psutil.virtual_memory().available
    if store.kind != "dram" and HOST_BYTES * n_params > AUTO_STORE_FRACTION * available:
        return "store"
    return "host"


def _moments(kind: str, meta: dict, device: Any, store: Store) -> moments.Moments:
    """The running sums of `kind` (_moments_kind; see SWAGPosterior.create)."""
    n_params, padded = meta["n_params"], meta["moments_len"]
    if kind == "device":
        return TorchMoments(n_params, padded, device)
    if kind == "store":
        return StoreMoments(store, n_params, padded)
    return moments.HostMoments(n_params, padded)


class SWAGPosterior:
    """SWAG: N(θ̄, scale·(Σ_diag + D Dᵀ/(K−1))) from iterates kept on a memory tier."""

    required_bytes = staticmethod(layout.required_bytes)

    def __init__(
        self, store: Store, meta: dict, readonly: bool, moments: str = "auto", device: Any = None
    ) -> None:
        self.store = store
        self.meta = meta
        self.n_params: int = meta["n_params"]
        self.max_rank: int | None = meta["max_rank"]
        self.capacity: int = meta["capacity"]
        self.dtype = np.dtype(meta["dtype"])
        self.checkpoint_every: int = meta["checkpoint_every"]
        self.deviations: str = layout.deviations_of(meta)
        self.readonly = readonly
        self._count = 0
        # updates given to the moments (rows after them wait in the log's staged ring), and those
        # known to be in them (rows from there to _folded are being added on the moments' thread)
        self._folded = self._safe = 0
        kind = _moments_kind(moments, self.n_params, readonly, store)
        self._moments = _moments(kind, meta, device, store)
        # the moments on the tier need no row of the ring beyond the staged and the written one
        least = 2 if kind == "store" and not meta.get("codec") else 3
        staged = 0 if readonly else staged_rows(self.n_params, meta["dtype"], least)
        if not readonly:
            warm(self.dtype)  # the kernels, before the first update
        self.log = log_class(meta)(store, meta, identity_seed(meta["id"]), staged)
        self._journal = Journal(store, identity_seed(meta["id"]), self.log, self._moments, readonly)
        # a writer's threads: one stamps each staged row (its trailer's digest) while the one
        # before it is written by the other, which then writes its count
        self._stamp: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        if not readonly:
            self._stamp, self._io = started_pool("nvmlib-stamp"), started_pool("nvmlib-update")
            self._journal.start()
        self._pending: Future | None = None  # the write of row self._count, while in flight
        self._staging = 0  # the slot of the staged ring the last update staged into
        self._closed = False

    # ---- creating and opening -----------------------------------------------------------
    @classmethod
    def create(
        cls,
        store: Store,
        n_params: int,
        max_rank: int | None = None,
        dtype: str = "float32",
        checkpoint_every: int = 100,
        capacity: int | None = None,
        model: str | None = None,
        overwrite: bool = False,
        codec: str | None = None,
        moments: str = "auto",
        device: Any = None,
        deviations: str = "final",
    ) -> "SWAGPosterior":
        """A new, empty posterior on `store`. max_rank=None keeps every iterate (up to `capacity`).

        codec: None keeps raw rows; "delta-zstd" or "delta-lz4" stores each iterate as the
        compressed XOR with the one before it (lossless: every row reads back bit-exact), in chunks
        that each start with a keyframe (layout.chunk_for: a quarter of the kept iterates, 2 to 32).

        overwrite=True replaces a posterior already there, but only after every check the new one
        must pass (arguments, free space, the file size limit): a refused create deletes nothing.

        moments: where the float64 sums (16 bytes a parameter) live while collecting: "host" (RAM,
        the numba kernels; with θ₀ and a checkpoint's copy, 40 bytes a parameter), "device" (a
        torch device, `device`, e.g. the model's GPU: the host then only writes rows and
        checkpoints), "store" (this posterior's tier, a block of parameters at a time: RAM holds
        a few blocks and two staged rows, for models whose moments do not fit; each batch of rows
        reads and writes 40 bytes a parameter there), or "auto" (store when host moments would
        take more than half the memory available, on a tier other than dram; else host). Not part
        of the posterior's format: open() may choose another; a reader's are in RAM.

        deviations: what the kept rows of D are centred on. "final" (the default): the mean θ̄ of
        all collected iterates, θ_k − θ̄. "running": the mean at the row's collection, θ_k − θ̄_k
        with θ̄_k the mean of iterates 0..k, as Maddox et al.'s Algorithm 1 and code
        (swa_gaussian) and torch-uncertainty compute it. Both are applied at sampling time in the
        same single pass over the log; stored in the meta, so open() keeps it."""
        meta = layout.new_meta(
            n_params, max_rank, dtype, checkpoint_every, capacity, model, codec, deviations
        )
        _check_moments(moments, device)
        n, cap = meta["n_params"], meta["capacity"]
        store.lock(LOG)
        try:
            if META in store:
                try:
                    read_meta(store)
                    whole = True
                except PosteriorError as exc:
                    whole = "incomplete" not in str(exc)  # a torn create holds nothing to keep
                if whole and not overwrite:
                    raise PosteriorError(
                        f"{store.describe()} already holds a posterior; open it with "
                        "SWAGPosterior.open, pass overwrite=True (train: --overwrite), "
                        "or choose another path"
                    )
            old = [name for name in NAMES if name in store]  # or a torn create's
            room = (
                ""
                if codec is None
                else (
                    f", {codec} at {ASSUMED_RATIO}x less than raw rows"
                    if store.grows
                    else f", {codec} with room for incompressible rows: "
                    f"{store.describe()} does not grow"
                )
            )
            kind = _moments_kind(moments, n, False, store)
            scratch = StoreMoments.scratch_bytes(meta) if kind == "store" else 0
            check_fits(
                store,
                layout.required_bytes(n, cap, meta["dtype"], codec, store.grows) + scratch,
                f"a posterior of {cap} iterates × {n} parameters ({meta['dtype']}{room}"
                + (", its moments on the tier" if scratch else "")
                + ")",
                reclaimable=sum(store.occupied(name) for name in old),
            )
            arrays = layout.arrays(meta)
            for name, (shape, dt) in arrays.items():
                layout.check_file_size_limit(
                    store, name, int(np.prod(shape)) * np.dtype(dt).itemsize
                )
            for name in old:
                store.delete(name)
            sparse = log_class(meta).SPARSE
            for name, (shape, dt) in arrays.items():
                (store.create_log if name == LOG else store.create)(
                    name, shape, dt, sparse=name in sparse
                )
            post = cls(store, meta, readonly=False, moments=kind, device=device)
            post._journal.checkpoint(0, force=True)
            layout.write_meta(store, meta)
        except BaseException:
            store.unlock(LOG)
            raise
        return post

    @classmethod
    def open(
        cls,
        store: Store,
        n_params: int | None = None,
        model: str | None = None,
        readonly: bool = False,
        moments: str = "auto",
        device: Any = None,
    ) -> "SWAGPosterior":
        """Reopen the posterior `store` holds, recovering any updates made after its last
        checkpoint.

        readonly=True: a reader; it sees one consistent snapshot even while a writer collects.
        moments, device: where the sums live, as for create()."""
        _check_moments(moments, device)
        meta = read_meta(store)
        if n_params is not None and meta["n_params"] != n_params:
            raise PosteriorError(
                f"the posterior on {store.describe()} was made for {meta['n_params']} "
                f"parameters, not {n_params}: it belongs to another model "
                f"({meta.get('model') or 'unnamed'}); open the right path"
            )
        if model is not None and (meta.get("model") or model).split("#")[0] != model:
            raise PosteriorError(
                f"the posterior on {store.describe()} was made for model "
                f"{meta['model']!r}, not {model!r}; open the right path"
            )
        if not readonly:
            if store.readonly:
                raise PosteriorError(
                    f"{store.describe()} was opened read-only: open the posterior "
                    "with readonly=True, or open the store for writing"
                )
            store.lock(LOG)
        post = cls(store, meta, readonly, moments, device)
        try:
            layout.check_shapes(store, meta)
            post._open_snapshot()
        except BaseException:
            if not readonly:
                store.unlock(LOG)
            raise
        return post

    @classmethod
    def view(cls, store: Store, meta: dict, count: int) -> "SWAGPosterior":
        """A read-only view of the log as it stood after `count` updates, without moments or
        recovery: for a process that only reads kept rows (a dask worker, nvmlib.dask)."""
        post = cls(store, meta, readonly=True)
        post._count = post._folded = post._safe = count
        return post

    def _open_snapshot(self) -> None:
        """Recover the newest state; a reader retries while a running writer changes what it
        reads."""
        journal = self._journal
        for attempt in range(SNAPSHOT_TRIES if self.readonly else 1):
            before = journal.state()
            try:
                self._count = journal.recover(journal.read_count(), exact=False)
                self._folded = self._safe = self._count
                break
            except PosteriorError:
                if (
                    not self.readonly
                    or (journal.state() == before and attempt > 0)
                    or attempt + 1 == SNAPSHOT_TRIES
                ):
                    raise
        if not self.readonly:  # rows a crash left beyond the recovered count, in any slot (rows
            # are persisted behind the count's writes: a crash may keep several beyond it)
            journal.discard(self._count, self._count + self.log.slots)

    def refresh(self) -> None:
        """A reader: move to the newest snapshot the writer has made durable (n_collected, mean,
        variance and kept rows all of it); unchanged if that fails. A writer: nothing to do."""
        self._check_open()
        if self.readonly:
            with self._unchanged_on_error():
                self._open_snapshot()

    def _reading(self, read: Callable[[], T]) -> T:
        """`read()`; for a reader whose rows a running writer overwrote meanwhile, again on a newer
        snapshot (refresh), up to SNAPSHOT_TRIES times, so that a reader never has to catch and
        reopen."""
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
        return sum(self.store.occupied(name) for name in NAMES if name in self.store)

    @property
    def stored_bytes(self) -> int:
        """The same as nbytes (a compressed log occupies what it stores); the records alone:
        `post.log.stored_bytes(first, stop)`."""
        return self.nbytes

    def __repr__(self) -> str:
        return (
            f"<SWAGPosterior n_params={self.n_params} n_collected={self._count} "
            f"rank={self.rank} max_rank={self.max_rank} on {self.store.describe()}>"
        )

    # ---- collecting ---------------------------------------------------------------------
    def update(self, theta: Any) -> bool:
        """Record one iterate: append its row to the log and add it to the moments.

        The row is cast into the log's ring of staged rows while the previous one is still being
        written, then written (and then counted on the tier) on a pool thread; it is in flight when
        update() returns, and settles at the next call (so writing the row overlaps the next
        training step; a failed write raises there, and the iterate is not recorded). The moments'
        thread adds the written rows in batches (moments.GROUP), and anything that reads the moments
        waits for it. Returns True when this update took a checkpoint of every update so far, its
        row included: a point training can resume from. The checkpoint is written behind training,
        after this row's write (the log and count persisted, then the moments and their commit
        record; no I/O is waited for here), and is durable once the next checkpoint, flush() or
        close() has waited for it; if writing it failed, that call raises StoreError, and a crash
        would rebuild the updates from the checkpoint before it and the rows after it (so keep the
        train state of the True before as well: its checkpoint was durable before this one began). A
        crash can lose only updates after the last durable checkpoint (a SIGKILL right after a True
        can leave the posterior one update short of it: this row was in flight), and a reopen
        rebuilds a consistent posterior of the rows that reached the tier.
        """
        self._check_usable(write=True)
        vec = _as_vector(theta, self.n_params)
        return self._record(
            lambda row: moments.stage(vec, row), lambda: _not_finite(vec, self.dtype)
        )

    def update_from(self, fill: Callable[[np.ndarray], None]) -> bool:
        """update() of the iterate that `fill(row)` writes straight into the log's staged row (a
        1-D array of n_params in the log's dtype, `dtype`): a CPU model's stager flattens its
        parameters there, which saves a copy of θ and the memory of one. The row is then checked
        for NaN/Inf (InputError; nothing recorded) and recorded as update() records it."""
        self._check_usable(write=True)
        n = self.n_params

        def staged(row: np.ndarray) -> bool:
            fill(row[:n])
            return moments.finite(row[:n])

        return self._record(
            staged, lambda: _not_finite(self.log.rows[self._staging][:n], self.dtype)
        )

    def _record(
        self, stage: Callable[[np.ndarray], bool], refused: Callable[[], InputError]
    ) -> bool:
        """update()'s work once θ is known: `stage(row)` puts it in the staged row and says
        whether it is finite (`refused()` gives the error when it is not)."""
        self._journal.poll()
        if self.max_rank is None and self._count + (self._pending is not None) >= self.capacity:
            self._settle()  # whether the log is full depends on the row in flight
            if self._count >= self.capacity:
                raise PosteriorError(
                    f"the log is full: it was created for {self.capacity} "
                    "iterates; create the posterior with a larger capacity or a "
                    "max_rank (ring)"
                )
        t = self._count + (self._pending is not None)
        ring = len(self.log.rows)
        if t - ring >= self._known_folded():  # the slot holds a row the moments have yet to add
            self._fold()
        self._staging = t % ring
        if not stage(self.log.rows[self._staging]):  # the moments are of what the tier stores
            raise refused()
        stamped = self._stamp.submit(self.log.stamp, t)
        self._settle()  # the previous row: a failure raises here, and this one is not recorded
        if t == 0:
            self._journal.set_shift(self.log.rows[self._staging])
        # written (a compressed log encodes it there), then counted on the tier, on the writer's
        # thread while the rows before it are added
        self._pending = self._io.submit(self._write, t, stamped)
        if self._count - self._folded >= min(moments.GROUP, ring - 2):
            self._fold(wait=False)
        if t == 0 or t + 1 - self._journal.ckpt_count >= self.checkpoint_every:
            if self._journal.failed:  # the last one written behind failed: this one inline
                self._settle()
                self._fold(wait=False)
                self._checkpoint_or_uncount(lambda: self._journal.checkpoint(self._count))
                return True
            self._checkpoint_or_uncount(self._journal.wait)
            self._fold(wait=False)
            # this row joins the moments once its write succeeded, and the checkpoint of every
            # update, it included, is written behind it: this call waits for no I/O
            self._journal.fold_after(self.log.rows, self._staging, self._pending)
            self._folded = t + 1
            self._journal.checkpoint(t + 1, behind=True, after=self._pending)
            return True
        return False

    def _write(self, t: int, stamped: Future) -> None:
        """Write staged row t as iterate t once `stamped`, then the count that covers it (on the
        writer's thread)."""
        stamped.result()
        self.log.write(t)
        self.log.order()  # the row, then the count that covers it
        self._journal.write_count(t + 1)

    def _checkpoint_or_uncount(self, checkpoint: Callable[[], None]) -> None:
        """Run `checkpoint`; if it raises, this update is undone (counted first): not recorded."""
        try:
            checkpoint()
        except BaseException:
            self._settle()
            self._uncount()
            raise

    def _uncount(self) -> None:
        """Undo the last update after its checkpoint failed (a full disk): the live state, the
        count on the tier and the row go back to the update before, so a retry records the iterate
        once."""
        count = self._count - 1
        self._journal.forget_after(count)
        self._roll_back(count)
        self._journal.discard(count, count + 1)
        self._journal.write_count(count)

    def updates_to_checkpoint(self) -> int:
        """How many more updates until one writes a checkpoint (1: the next one does)."""
        self._settle()
        if self._count == 0:
            return 1
        return max(1, self.checkpoint_every - (self._count - self._journal.ckpt_count))

    def _settle(self) -> None:
        """Wait for the row in flight; then count it (the moments add it later), or drop it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except BaseException as exc:
            if self._folded > self._count:  # its moments job skips it: it joins them when retried
                self._folded, self._safe = self._count, min(self._safe, self._count)
            if isinstance(
                exc, StoreError
            ):  # the row was written behind the update() call that gave it
                raise StoreError(
                    f"{exc}. Iterate {self._count}, given to the last update() call, "
                    f"was not recorded: n_collected stays {self._count}; record it "
                    "again"
                ) from exc
            raise
        self._count += 1

    def _fold(self, wait: bool = True) -> None:
        """Give the counted rows that wait in the staged ring to the moments' thread, which adds
        them in one pass over the sums; with `wait`, until every counted row is in the moments."""
        if self._count > self._folded:  # a writer's (a reader's moments come from the tier)
            staged = self.log.rows
            self._journal.fold(staged, self._folded % len(staged), self._count - self._folded)
            self._folded = self._count
        if wait:
            self._journal.folded()
            self._safe = self._folded

    def _known_folded(self) -> int:
        """Updates known to be in the moments (their staged rows may be reused), without waiting:
        every one given to them once the last batch is done."""
        if self._journal.caught_up():
            self._safe = self._folded
        return self._safe

    def flush(self) -> None:
        """Checkpoint now, and wait for a checkpoint written behind: everything collected so far
        becomes durable."""
        self._check_open(write=True)
        self._journal.checkpoint(self._count)

    def _roll_back(self, count: int) -> None:
        """Make the live state the posterior after `count` (<= now) updates: the empty one, or a
        checkpoint plus replay. Refused (PosteriorError) when the log no longer holds what that
        needs; the live moments, shift and counters are then exactly as they were."""
        self._journal.wait()
        with self._unchanged_on_error():
            if count == 0:
                self._moments.clear()
                self._count = 0
            else:
                self._count = self._journal.recover(count, exact=True)
            self._folded = self._safe = self._count

    @contextmanager
    def _unchanged_on_error(self) -> Iterator[None]:
        """Restore the live moments and counters if the block raises (a refused call changes
        nothing)."""
        j = self._journal
        self._fold()
        saved = self._moments.saved(), self._count, self._folded, j.seq, j.ckpt_count
        try:
            yield
        except BaseException:
            j.folded()
            self._moments.restore(saved[0])
            self._count, self._folded, j.seq, j.ckpt_count = saved[1:]
            self._safe = self._folded
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
            usable = [c[1] for c in self._journal.checkpoints(old, []) if c[1] >= first]
            can = f"0, or any count from {min(usable)} to {old}" if usable else "0"
            raise PosteriorError(
                f"cannot truncate to {count} updates: that state needs a checkpoint at or before "
                f"{count} and every iterate after it, but the ring (max_rank={self.max_rank}) "
                f"keeps only iterates {first}..{old - 1} and no checkpoint at or before {count} is "
                "among them (or a row after it fails its checksum). This posterior can be "
                f"truncated to {can}. Nothing was changed"
            ) from None
        self._journal.discard(int(count), old)
        self._journal.write_count(int(count))
        self._journal.checkpoint(int(count), force=True)
        # both slots now hold this count: no record of the dropped updates is left
        self._journal.checkpoint(int(count), force=True)

    # ---- the posterior ------------------------------------------------------------------
    def mean(self) -> np.ndarray:
        """θ̄, the SWA solution (float64)."""
        self._check_nonempty()
        return self._moments.mean(self._count)

    def variance(self) -> np.ndarray:
        """Σ_diag = E[θ²] − θ̄², clamped at 0 (float64)."""
        self._check_nonempty()
        return self._moments.variance(self._count)

    def sample(
        self,
        S: int,
        scale: float = 0.5,
        seed: int | None = None,
        executor: Any = None,
        out: Store | None = None,
        name: str = DRAWS,
    ) -> np.ndarray | Draws:
        """S draws θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)), (S, n_params) float32, in one pass over the log.

        The pass goes over blocks of parameters (sampling.BLOCK): each kept row's block is read
        once, the block's draws computed and handed on, so with out= its memory is a few blocks ×
        (K + S), whatever S and n_params. out: a store (any tier) to write the draws to, as the
        array `name` (replacing one of that name): returns a Draws whose rows are read on demand,
        equal to the in-memory draws of the same seed; refused (StoreError) before anything is
        written when the store has no room. A compressed log decodes each kept row once into a
        block-major copy beside the draws (on `out`, else in memory: K × n_params).

        With fewer than 2 kept rows only the diagonal part is used. executor: an object whose
        low_rank(posterior, z2, mean) computes D z₂ elsewhere (nvmlib.dask.DaskExecutor: where the
        zarr log lies); the same array as without one, to float32 rounding. A reader overtaken
        by a running writer draws again from a newer snapshot (refresh): the draws belong to the
        snapshot that n_collected, mean() and variance() show once this returns."""
        S, scale = check_sampling(S, scale)
        if out is not None:
            self._check_out(out, name, S)
        return self._reading(lambda: self._draw(S, scale, seed, executor, out, name))

    def _check_out(self, out: Store, name: str, S: int) -> None:
        """Refuse, before anything is written, an `out` that cannot take S draws as `name`."""
        if name in NAMES:
            raise InputError(
                f"name={name!r} is one of the posterior's own arrays: write the draws "
                f"under another name (the default is {DRAWS!r})"
            )
        if out.readonly:
            raise StoreError(
                f"{out.describe()} was opened read-only: open a store for writing to take the draws"
            )
        self._settle()
        need = Draws.nbytes(S, self.n_params)
        if self.meta.get("codec") and self.rank >= 2:
            need += Draws.nbytes(self.rank, self.n_params, self.dtype)
        have = sum(out.nbytes(n) for n in (name, name + SHAPE) if n in out)
        check_fits(
            out, need, f"{S} draws of {self.n_params} parameters (float32)", reclaimable=have
        )

    def _draw(
        self, S: int, scale: float, seed: int | None, executor: Any, out: Store | None, name: str
    ) -> np.ndarray | Draws:
        """sample() on the snapshot held, D z₂ from a block-wise pass here or from the executor;
        the draws in memory, or as `name` on `out` (removed again if the pass fails)."""
        self._check_nonempty()
        if out is not None and not self.readonly:  # sampling to a tier: memory is short
            self.log.release_staging()
        draws = None if out is None else Draws.create(out, name, S, self.n_params)
        held = np.empty((S, self.n_params), np.float32) if draws is None else None

        def sink(a: int, b: int, part: np.ndarray) -> None:
            if draws is None:
                held[:, a:b] = part
            else:
                draws.write_block(a, b, part)

        try:
            if executor is None:
                self._draw_blocks(S, scale, seed, sink, out, name)
            else:

                def low(coef: torch.Tensor, mean: np.ndarray) -> torch.Tensor:
                    return torch.from_numpy(executor.low_rank(self, coef.numpy(), mean))

                draw(
                    S,
                    scale,
                    seed,
                    self.mean(),
                    self.variance(),
                    self.rank,
                    self.work_dtype,
                    low,
                    sink,
                    count=self._count,
                    deviations=self.deviations,
                )
        except BaseException:
            if draws is not None:
                draws.delete()
            raise
        return held if draws is None else draws

    def _draw_blocks(
        self, S: int, scale: float, seed: int | None, sink: Sink, out: Store | None, name: str
    ) -> None:
        """The local pass of sample() over parameter blocks; a raw log's kept rows read a block at
        a time (and verified once all are read), a compressed log's decoded once into a
        block-major copy (`name`.rows on `out`, or in memory)."""
        count, K = self._count, self.rank
        first = count - K

        def stats(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
            return self._moments.mean(count, a, b), self._moments.variance(count, a, b)

        args = (S, scale, seed, self.n_params, K, self.work_dtype, stats)
        centred = {"count": count, "deviations": self.deviations}
        if K < 2:
            return draw_blocks(*args, None, sink, **centred)
        if not self.meta.get("codec"):
            columns = self.log.columns(first, count)
            self._verified(K, *columns.verify())
            draw_blocks(*args, columns.read, sink, **centred)
            return self._verified(K, *columns.verify())
        copy = Draws.create(
            out if out is not None else open_store("dram"),
            name + ".rows",
            K,
            self.n_params,
            self.dtype,
        )
        try:
            for t, rows in self.stream([(first, count)]):
                for i, row in enumerate(rows):
                    copy.write_row(t - first + i, row)
            draw_blocks(*args, copy.read_block, sink, **centred)
        finally:
            copy.delete()

    @property
    def work_dtype(self) -> type:
        """The precision samples are computed in: the log's (float64 for a float64 log, else
        float32)."""
        return np.float64 if self.dtype == np.float64 else np.float32

    def low_rank(self, coef: torch.Tensor, mean: np.ndarray) -> torch.Tensor:
        """Σ_k cₖ (θ_k − θ̄) over the K kept rows, (S, n_params) in coef's dtype, from one streamed
        pass over the log (coef: (K, S), sampling.coefficients of z₂ for this posterior's
        deviations, which make it D z₂; mean: θ̄ in that dtype)."""
        self._check_nonempty()
        first = self._count - self.rank
        return low_rank(self.stream([(first, self._count)]), coef, mean, first)

    def deviation_rows(self) -> np.ndarray:
        """D: the K kept rows centred as `deviations` says, (rank, n_params) float64, oldest
        first: θ_k − θ̄ ("final") or θ_k − θ̄_k, θ̄_k the mean of iterates 0..k ("running"),
        from kept_rows() and the moments (K × n_params in memory)."""
        rows = self.kept_rows().astype(np.float64)  # a reader: of the snapshot it moved to
        rows -= self.mean()
        if self.deviations == "running":
            rows = running(self._count - len(rows), self._count) @ rows
        return rows

    def read_groups(self, group_bytes: int) -> list[Runs]:
        """The kept iterates as runs [t0, t1) that each lie in one shard of the store (or, for a
        compressed log, whole chunks), grouped into about `group_bytes` of log each, in the log's
        order: the shares of a pass over the log that readers elsewhere can take."""
        self._settle()
        return self.log.groups(self._count - self.rank, self._count, group_bytes)

    def _checked(self, batch: Batch) -> tuple[int, np.ndarray]:
        """A streamed batch's (first iterate, rows), once all its rows verify."""
        first, rows, ok, why = batch
        self._verified(len(rows), ok, why)
        return first, rows

    def _verified(self, n: int, ok: int, why: str) -> None:
        """Nothing when all n rows read verify (ok of them did, `why` says why the next did not);
        else SnapshotError (a running writer overtook this reader) or PosteriorError."""
        if ok < n or why:
            if self._overtaken(why):
                raise SnapshotError(why + "; reopen the posterior for a newer snapshot")
            raise PosteriorError(
                why + f"; mean and variance are intact, but iterates "
                f"{self._count - self.rank}..{self._count} (sample, kept_rows) "
                "cannot be trusted"
            )

    def _overtaken(self, why: str) -> bool:
        """Whether a row failed because a running writer moved past this reader's snapshot: the row
        holds a newer iterate, or the writer's count has advanced since (so the row may have been
        read while it was being overwritten, torn) and not because it is damaged."""
        if "overwritten" in why:
            return True
        if not self.readonly:
            return False
        now = self._journal.read_count()
        return now is None or now > self._count

    def stream(self, runs: Runs) -> Iterator[tuple[int, np.ndarray]]:
        """(first iterate, rows) batches of the iterates of `runs` ([t0, t1) ranges, in this order),
        each read while the previous one is used (the first read starts at once);
        SnapshotError/PosteriorError at a row that does not verify. The rows' buffer is reused:
        copy what must outlive the next batch."""
        return (self._checked(batch) for batch in self.log.stream(runs))

    def iterates(self, start: int, stop: int) -> np.ndarray:
        """Iterates θ_start … θ_stop−1, (stop − start, n_params) in the log's dtype; only the kept
        ones (the last `rank`) can be read."""
        self._check_open()
        first = self._count - self.rank
        if not first <= start <= stop <= self._count:
            raise ValueError(
                f"iterates {start}..{stop} are not all kept: this posterior keeps "
                f"{first}..{self._count} (max_rank={self.max_rank})"
            )
        out = np.empty((stop - start, self.n_params), self.dtype)
        for t, rows in self.stream([(start, stop)]):
            out[t - start : t - start + len(rows)] = rows
        return out

    def kept_rows(self) -> np.ndarray:
        """The K kept iterates, oldest first: the raw Θ behind D. A reader overtaken by a running
        writer reads them again from a newer snapshot (refresh): they are those of n_collected once
        this returns."""
        self._check_nonempty()
        return self._reading(lambda: self.iterates(self._count - self.rank, self._count))

    # ---- closing ------------------------------------------------------------------------
    def close(self) -> None:
        """Checkpoint, persist, publish the log (plain zarr then reads what nvmlib reads),
        release the writer lock and give back the memory of the moments and the staged rows (a
        closed posterior that is still referenced holds none). The store stays open."""
        if self._closed:
            return
        try:
            if not self.readonly:
                self._settle()
                self._fold()
                self._journal.checkpoint(self._count)  # nothing when this count is checkpointed
                for name in self.log.arrays(self.meta):
                    self.store.publish(name)
        finally:
            if not self.readonly:
                self.store.unlock(LOG)
            for pool in (self._stamp, self._io):
                if pool is not None:
                    pool.shutdown()
            self._journal.close()
            self._moments.close()
            self.log.close()
            self._closed = True

    def __enter__(self) -> "SWAGPosterior":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_usable(self, write: bool = False) -> None:
        if self._closed:
            raise PosteriorError(
                "this posterior was closed; reopen it with SWAGPosterior.open(store)"
            )
        if write and self.readonly:
            raise PosteriorError(
                "this posterior was opened read-only; open it with readonly=False to write"
            )

    def _check_open(self, write: bool = False) -> None:
        """Usable, with the row in flight settled and every counted row in the moments."""
        self._check_usable(write)
        self._settle()
        self._fold()

    def _check_nonempty(self) -> None:
        self._check_open()
        if self._count == 0:
            raise PosteriorError("the posterior holds no iterates yet: call update(θ) first")
