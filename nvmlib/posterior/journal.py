"""A posterior's durable progress: the count of written rows, two checkpoint slots, and recovery.

The moments change on the journal's moments thread (`fold`), in order with the snapshots that
checkpoints take of them. Durability order: an update's row, then its count; at a checkpoint the log
and count are persisted, then the first iterate (the shift, once), then the moments go to the older
slot, then its commit record. With `behind=True` all of it runs on the journal's own thread, from a
snapshot of the moments copied there: the update that takes the checkpoint does not wait for any of
its I/O, and the checkpoint is durable once the next checkpoint, flush, truncate, recovery or close
has waited for it (each raises what failed). One checkpoint is in flight at a time, so the rows
since the last durable one stay in the log. A torn record or slot fails its checksum and recovery
falls back to the other one. Recovery = the newest valid checkpoint + replay of the rows appended
after it that verify, up to the count (checkpoint_every <= capacity / 2 keeps them in the log).
Every digest is seeded with the posterior's identity, so files of two posteriors never mix.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from nvmlib.backends.base import Store, aligned_empty
from nvmlib.errors import PosteriorError, SnapshotError, StoreError
from nvmlib.posterior.checksum import digest
from nvmlib.posterior.layout import COMMIT, COUNT, MOMENTS, SHIFT
from nvmlib.posterior.log import REPLAY_ROWS, Log
from nvmlib.posterior.moments import Moments

Checkpoint = tuple[int, int, int, int]  # (seq, count, moments digest, shift digest)


def started_pool(name: str) -> ThreadPoolExecutor:
    """A one-thread pool whose thread is running already."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    pool.submit(int).result()
    return pool


class _RowFailed(Exception):
    """A checkpoint written behind was dropped: the write of the last row it covers failed."""


class Journal:
    """The count, checkpoints and recovery of the posterior whose `log` and `moments` it records."""

    def __init__(
        self, store: Store, ident: int, log: Log, moments: Moments, readonly: bool
    ) -> None:
        self.store = store
        self.ident = ident
        self.log = log
        self.moments = moments
        self.readonly = readonly
        self.seq = 0  # of the newest checkpoint (taken: it may still be being written)
        self.ckpt_count = 0  # updates it covers
        self._durable = (0, 0)  # (seq, count) of the newest checkpoint known to be written
        self._pool: ThreadPoolExecutor | None = None  # writes checkpoints behind updates
        self._adder: ThreadPoolExecutor | None = None  # adds rows to the moments, and copies them
        self._folding: Future | None = None  # the last batch of rows given to it
        self._copy: Future | None = None  # the snapshot of the moments, while it is copied
        self._write: Future | None = None  # the checkpoint in flight
        self._frozen: np.ndarray | None = None  # the snapshot it writes
        self.failed = False  # the last checkpoint written behind failed: write the next inline
        self._shift_on_tier: int | None = None  # digest of the shift the tier holds (None: unknown)

    # ---- the count -------------------------------------------------------------------------
    def read_count(self) -> int | None:
        """The count the writer last recorded, or None when it fails its checksum (torn, edited)."""
        count, check = (int(x) for x in self.store.read_rows(COUNT, 0, 2))
        ok = check == digest(np.array([count], np.int64), self.ident) and count >= 0
        return count if ok else None

    def write_count(self, count: int) -> None:
        value = np.array([count], np.int64)
        self.store.write_rows(
            COUNT, 0, np.append(value, digest(value, self.ident)).astype(np.int64)
        )

    def state(self) -> tuple[bytes, bytes]:
        """The count and commit records as they stand (a reader sees whether a writer moved)."""
        return (
            self.store.read_rows(COUNT, 0, 2).tobytes(),
            self.store.read_rows(COMMIT, 0, 2).tobytes(),
        )

    def write_shift(self) -> None:
        self.moments.write_shift(self.store)
        self.store.persist(SHIFT)
        self._shift_on_tier = self.moments.shift_digest(self.ident)

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(
        self, count: int, force: bool = False, behind: bool = False, after: Future | None = None
    ) -> None:
        """Persist log and count, then the moments into the older slot, then its commit record.
        Without `force`, a count already checkpointed is not written again: the other slot keeps
        the checkpoint before it (the one a saved train state may point to). `behind`: all of it
        runs on the journal's thread, from a copy of the moments; wait() (or the next checkpoint)
        waits for it and raises what failed. `after`: the write of the last row it covers, which
        it waits for first (that row given to fold_after); if that write failed, the checkpoint is
        dropped without a word: whoever settles the row raises its error."""
        self.wait()
        if not force and count == self.ckpt_count:
            return
        seq = self.seq + 1
        moments, slot = self.moments, seq % 2
        if not behind:
            self.folded()
            self._commit(
                seq,
                count,
                lambda: moments.write_slot(self.store, slot, self.ident),
                lambda: moments.shift_digest(self.ident),
            )
            self.seq, self.ckpt_count = self._durable = seq, count
            return
        # θ₀ is set on the moments' thread (set_shift)
        shift = self._moments_thread().submit(moments.shift_digest, self.ident).result
        if moments.FROZEN:  # copied on the moments' thread, then written from the copy
            if self._frozen is None:
                self._frozen = aligned_empty((2, moments.padded), np.float64)
            frozen = self._frozen
            self._copy = copy = self._moments_thread().submit(moments.snapshot, frozen)

            def written() -> int:
                copy.result()
                return moments.write_slot(self.store, slot, self.ident, frozen)

        else:  # written into the slot on the moments' thread, in order with the folds
            self._copy = copy = self._moments_thread().submit(
                moments.write_slot, self.store, slot, self.ident
            )
            written = copy.result
        self._write = self._checkpoint_thread().submit(
            self._commit, seq, count, written, shift, after
        )
        self.seq, self.ckpt_count = seq, count

    # ---- the moments' thread ---------------------------------------------------------------
    def _moments_thread(self) -> ThreadPoolExecutor:
        if self._adder is None:
            self._adder = started_pool("nvmlib-moments")
        return self._adder

    def _checkpoint_thread(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = started_pool("nvmlib-checkpoint")
        return self._pool

    def start(self) -> None:
        """Start the writer's threads now, when the posterior is made, not in its first update."""
        self._moments_thread()
        self._checkpoint_thread()

    def set_shift(self, values: np.ndarray) -> None:
        """Make θ₀ `values` on the moments' thread (before the rows given after this call);
        `values` must not change until folded() returns."""
        self._moments_thread().submit(self.moments.set_shift, values)

    def fold(self, rows: np.ndarray, first: int, count: int) -> None:
        """Add rows first, first+1, … (`count`, indices modulo len(rows)) of the staged ring to
        the moments on the moments' thread, after what was given to it before; `rows` must not
        change until folded() returns (or caught_up() says True)."""
        self._folding = self._moments_thread().submit(self.moments.add_rows, rows, first, count)

    def fold_after(self, rows: np.ndarray, first: int, written: Future) -> None:
        """fold() of staged row `first` alone, once `written` (its write) has succeeded; if that
        failed, the row is left out."""

        def add() -> None:
            if written.exception() is None:
                self.moments.add_rows(rows, first, 1)

        self._folding = self._moments_thread().submit(add)

    def caught_up(self) -> bool:
        """Whether every row given to fold() is in the moments, without waiting (not when the last
        batch failed: folded() raises that)."""
        folding = self._folding
        return folding is None or (folding.done() and folding.exception() is None)

    def folded(self) -> None:
        """Wait until every row given to fold() is in the moments (and raise what failed)."""
        folding, self._folding = self._folding, None
        if folding is not None:
            folding.result()

    def _commit(
        self,
        seq: int,
        count: int,
        written: Callable[[], int],
        shift: Callable[[], int],
        after: Future | None = None,
    ) -> None:
        """Once `after` (a row's write) is done: persist the log and count (of at least `count`
        updates), the shift (whose digest `shift` gives) where the tier's differs, then the
        moments of `count` updates in slot seq % 2 (`written` writes them there, or waits until
        they are, and gives their digest), then its commit record."""
        if after is not None and after.exception() is not None:
            raise _RowFailed
        self.log.persist()
        self.store.persist(COUNT)
        d_shift = shift()
        if count and d_shift != self._shift_on_tier:
            self.write_shift()
        slot = seq % 2
        d_moments = written()
        self.store.persist(MOMENTS)
        head = np.array([seq, count, d_moments, d_shift, self.ident], dtype=np.int64)
        record = np.append(head, digest(head, self.ident)).astype(np.int64)
        self.store.write_rows(COMMIT, slot, record[None])
        self.store.persist(COMMIT)

    def copied(self) -> None:
        """Wait until the snapshot of a checkpoint in flight is copied: the moments may change."""
        if self._copy is not None:
            self._copy.result()
            self._copy = None

    def poll(self) -> None:
        """Raise what failed in the checkpoint written behind, if it is done (never waits)."""
        if self._write is not None and self._write.done():
            self.wait()

    def wait(self) -> None:
        """Wait for the checkpoint in flight. If it failed, the journal goes back to the checkpoint
        before it (its count is still recorded: the log holds every row since) and StoreError says
        so; the next checkpoint is then written inline."""
        write, self._write = self._write, None
        if write is None:
            return
        try:
            self.copied()
            write.result()
        except BaseException as exc:
            failed = self.ckpt_count
            self.seq, self.ckpt_count = self._durable
            self.failed = True
            if isinstance(exc, _RowFailed):
                return
            if isinstance(exc, StoreError):
                raise StoreError(
                    f"{exc}. The checkpoint of {failed} updates, written behind "
                    f"training, failed: the updates are recorded, but a crash would "
                    f"rebuild them from the checkpoint of {self.ckpt_count} updates "
                    "and the rows after it"
                ) from exc
            raise
        self._durable = self.seq, self.ckpt_count
        self.failed = False

    def forget_after(self, count: int) -> None:
        """Clear commit records of more than `count` updates (written, though their persist failed):
        no record may outlive its update."""
        self.wait()
        for slot, record in enumerate(self.store.read_rows(COMMIT, 0, 2)):
            if record[1] > count:
                self.store.write_rows(COMMIT, slot, np.zeros((1, 6), np.int64))

    def checkpoints(self, bound: int | None, problems: list[str]) -> list[Checkpoint]:
        """The valid commit records, newest first, at or before `bound` (None: any); what is wrong
        with the others goes to `problems`."""
        self.wait()
        valid = []
        for slot, r in enumerate(self.store.read_rows(COMMIT, 0, 2)):
            seq, count, d_moments, d_shift, ident, check = (int(x) for x in r)
            if seq == 0 and not r.any():
                continue  # never written
            if ident != self.ident:
                problems.append(
                    f"{COMMIT} slot {slot} belongs to another posterior (identity "
                    f"{ident:x}, not {self.ident:x}): files of two posteriors were mixed"
                )
            elif check != digest(r[:5], self.ident) or seq < 1 or count < 0 or seq % 2 != slot:
                problems.append(
                    f"{COMMIT} slot {slot} fails its checksum (a torn or damaged record)"
                )
            elif bound is None or count <= bound:
                valid.append((seq, count, d_moments, d_shift))
        return sorted(valid, reverse=True)

    # ---- recovery --------------------------------------------------------------------------
    def recover(self, bound: int | None, exact: bool) -> int:
        """Load the newest valid checkpoint at or before `bound` updates into the moments and replay
        the log's verified rows after it: up to `bound` (None, a count a crash tore: as far as the
        log holds them) or, unless `exact`, the first row that does not verify (a crash lost it).
        The count reached; every update of that checkpoint is present, or PosteriorError says what
        is damaged."""
        self.folded()
        problems: list[str] = []
        candidates = self.checkpoints(bound, problems)
        if bound is None:  # every row that verifies was written by this run: rows it dropped
            # (truncate, a refused update, a crash's leftovers) were discarded before the count
            bound = max((c[1] for c in candidates), default=0) + self.log.slots
        moments = self.moments
        if exact:  # the empty posterior: exact when rows 0..bound-1 are all still in the log
            candidates.append((0, 0, 0, -1))
        for seq, count, d_moments, d_shift in candidates:
            if seq:
                d_slot, load_slot = moments.read_slot(self.store, seq % 2, self.ident)
                if d_slot != d_moments:
                    problems.append(
                        f"{MOMENTS} slot {seq % 2} fails its checksum (checkpoint at {count} "
                        "updates)"
                    )
                    continue
            on_tier, load_shift = moments.read_shift(self.store, self.ident)
            if count > 0 and on_tier != d_shift:
                problems.append(
                    f"{SHIFT} fails its checksum: the first iterate, which every moment is "
                    "relative to, is damaged"
                )
                continue
            if seq:
                load_slot()
            else:
                moments.clear()
            load_shift()
            self._shift_on_tier = on_tier
            reached = self.replay(count, bound, problems)
            if reached < bound and (exact or reached < count):
                continue
            if (
                count == 0
                and reached > 0
                and not self.readonly
                and moments.shift_digest(self.ident) != on_tier
            ):
                self.write_shift()
            newest = max((c[0] for c in self.checkpoints(None, [])), default=0)
            self.seq, self.ckpt_count = self._durable = seq or newest, count
            return reached
        what = "; ".join(dict.fromkeys(problems)) or "no commit record was ever written"
        raise PosteriorError(
            f"the posterior on {self.store.describe()} cannot be rebuilt to {bound} "
            f"updates from a valid checkpoint: {what}. It is damaged beyond recovery"
        )

    def replay(self, start: int, stop: int, problems: list[str]) -> int:
        """Add the log's rows of iterates start..stop−1 to the moments until one fails to verify;
        the count reached. A reader whose rows a running writer overwrote gets SnapshotError."""
        step = REPLAY_ROWS * self.moments.n_params * self.log.dtype.itemsize
        for first, rows, ok, why in self.log.stream([(start, stop)], step):
            if first == 0 and ok:
                self.moments.set_shift(rows[0])
            self.moments.add_rows(rows[:ok])
            if why:
                if self.readonly and "overwritten" in why:
                    raise SnapshotError(why)
                problems.append(why)
                return first + ok
        return stop

    def discard(self, start: int, stop: int) -> None:
        """Invalidate the rows of iterates start..stop−1 still in the log (a truncate dropped them,
        or a crash left them beyond the recovered count), so that no later replay takes them for
        new ones; persisted before the count or checkpoint that relies on it."""
        if self.log.discard(start, stop):
            self.log.persist()

    def close(self) -> None:
        """Stop the journal's thread once the checkpoint in flight is written (the posterior's
        close() has waited for it, and raised what failed, at its last checkpoint)."""
        for pool in (self._pool, self._adder):
            if pool is not None:
                pool.shutdown()
        self._pool = self._adder = None
        self._frozen = None
