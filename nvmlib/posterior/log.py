"""The posterior's log of kept iterates on a store: raw rows, or compressed delta records.

RawLog (codec None)
  swag.log    (slots, row_len): iterate t in slot t % slots, a row = its n_params values, zero
              padding to 4 KiB (O_DIRECT's alignment, on every tier) and a 16-byte trailer
              [t, digest of the values seeded with (id, t)].
DeltaLog (codec "delta-zstd" / "delta-lz4", nvmlib.posterior.codec)
  swag.log    (blocks, 4096) uint8: a ring of blocks holding one record per iterate, each starting
              on a block; a record is the iterate XOR-ed with the one before it (a keyframe, the
              first of every `chunk` iterates, is the iterate itself), byte-grouped and compressed.
  swag.index  (slots, 7) int64: iterate t in slot t % slots = [t, first block (counting from the
              log's start, never wrapping), record bytes, its keyframe's iterate, digest of the
              record, digest of the decoded values, digest of this index row].
  Reading iterate t decodes from its keyframe, so the ring keeps whole chunks: `slots` =
  capacity + chunk index slots and as many worst-case records of blocks, so that the keyframe of
  the oldest kept iterate and the record being written are never overwritten; between K and
  K + chunk − 1 iterates are physically kept, and the posterior uses the last K, as the raw log
  does.
  On a tier that grows (Store.grows) the log is sparse: it occupies the records written, not the
  worst case. Each record's blocks are allocated before it is written (a full tier refuses the
  record there, with everything kept intact), and the blocks before the keyframe of the oldest
  iterate still kept (the chunks the ring dropped) are released as the ring moves on, so a ring
  occupies its kept chunks; the room is then checked record by record, not reserved.
Both: a row written by write(t) verifies only once it is whole (a torn one fails its digest); reads
report how many rows verified and why the next did not ("overwritten": a newer iterate took its
slot; "fails its checksum": damaged).
"""

from __future__ import annotations

import bisect
import itertools
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Protocol

import numpy as np

from nvmlib.backends.base import ALIGN, Store, aligned_empty, padded_len, release_pages
from nvmlib.posterior.checksum import Digest, digest, row_seed
from nvmlib.posterior.codec import DeltaCodec

LOG, INDEX = "swag.log", "swag.index"
TRAILER = 16  # bytes ending every raw row: int64 t, int64 digest
BLOCK = 4096  # bytes of a block of the compressed log (O_DIRECT's alignment)
CHUNK_BYTES = 128 << 20  # bytes read per step of a streamed pass
REPLAY_ROWS = 64  # rows per read when a recovery replays the log
STAGING_BYTES = 512 << 20  # bytes of the writer's ring of staged rows (3 to MAX_STAGED rows)
MAX_STAGED = 16

Batch = tuple[
    int, np.ndarray, int, str
]  # (first iterate, values, how many verify, why the next does not)
Runs = list[tuple[int, int]]  # [t0, t1) ranges of iterates, read in this order


def row_len_for(n_params: int, dtype: str) -> int:
    """Elements of one raw log row: n_params values and the trailer, padded to ALIGN bytes."""
    return padded_len(n_params + TRAILER // np.dtype(dtype).itemsize, dtype, ALIGN)


def layout(n_params: int, capacity: int, dtype: str, codec: str | None, chunk: int) -> dict:
    """The meta fields that describe a log of `capacity` kept iterates (codec None: raw rows)."""
    if codec is None:
        return {"codec": None, "row_len": row_len_for(n_params, dtype)}
    record = DeltaCodec.bound(np.dtype(dtype), n_params)
    return {"codec": codec, "chunk": chunk, "record_blocks": blocks_of(record)}


def staged_rows(n_params: int, dtype: str, least: int = 3) -> int:
    """Rows a writer stages: iterates wait there, written, until the moments add them as a batch
    (`least` at least: the row being staged, the one being written, and a delta log's base)."""
    rows = STAGING_BYTES // (n_params * np.dtype(dtype).itemsize)
    return int(min(MAX_STAGED, max(least, rows)))


def staging_ring(staged: int, row_len: int, dtype: np.dtype) -> np.ndarray:
    """A writer's ring of staged rows, zeroed (the padding stays zero) on huge pages: its pages
    are touched here, when the posterior is made, not in the first updates a training loop
    times."""
    ring = aligned_empty((staged, row_len), dtype, huge=True)
    ring[:] = 0
    return ring


# raw bytes per stored byte that a room check assumes of a compressed log on a tier that grows: the
# lowest ratio measured on real iterates (1.60x, SWAG's regime, docs/compressed-log.md), less 22%
ASSUMED_RATIO = 1.25


def log_bytes(meta: dict, grows: bool = False) -> int:
    """Bytes the log's arrays take on a tier; on one that grows (Store.grows), a compressed log's
    records are counted at ASSUMED_RATIO of raw rows (each is refused if it finds no room)."""
    arrays = log_class(meta).arrays(meta)
    total = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in arrays.values())
    if not (grows and meta.get("codec")):
        return total
    slots = arrays[INDEX][0][0]
    itemsize = np.dtype(meta["dtype"]).itemsize
    raw = slots * padded_len(meta["n_params"], meta["dtype"], BLOCK) * itemsize
    return total - arrays[LOG][0][0] * BLOCK + int(raw / ASSUMED_RATIO)


def blocks_of(nbytes: int) -> int:
    """Blocks a record of `nbytes` bytes takes (it starts on a block)."""
    return -(-int(nbytes) // BLOCK)


def record_end(row: np.ndarray) -> int:
    """The block after the record an index row points to."""
    return int(row[1]) + blocks_of(row[2])


def spans(start: int, stop: int, slots: int, step: int) -> list[tuple[int, int]]:
    """[a, b) slot ranges of a ring of `slots` holding positions start..stop−1 in order, each at
    most `step`."""
    out, t = [], start
    while t < stop:
        a = t % slots
        b = min(a + stop - t, slots, a + step)
        out.append((a, b))
        t += b - a
    return out


class Log(Protocol):
    """What the posterior needs of a log, raw or compressed: where a writer stages iterates
    (`rows`, a ring), writing iterate t, streamed reads that say which rows verify, invalidating
    dropped iterates, the groups readers elsewhere take, and durability."""

    rows: np.ndarray  # a writer's ring of staged rows: iterate t goes in row t % len(rows)
    SPARSE: frozenset[str]  # its arrays that take space as they are written, where the tier grows

    @staticmethod
    def arrays(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape, dtype) of the log's arrays on the store."""
        ...

    def stamp(self, t: int) -> None:
        """Ready staged row t % len(rows) to be written as iterate t (a raw row's trailer), on any
        thread, while the row before it is being written; write(t) follows it."""
        ...

    def write(self, t: int) -> None:
        """Write staged row t % len(rows), stamped, as iterate t."""
        ...

    def stream(self, runs: Runs, step_bytes: int = CHUNK_BYTES) -> Iterator[Batch]:
        """Batches of the iterates of `runs`, each read while the one before is used."""
        ...

    def discard(self, start: int, stop: int) -> bool:
        """Invalidate iterates start..stop−1 still in the log; whether any was."""
        ...

    def groups(self, start: int, stop: int, group_bytes: int) -> list[Runs]:
        """Iterates start..stop−1 in runs that readers elsewhere can take whole."""
        ...

    def stored_bytes(self, start: int, stop: int) -> int:
        """Bytes of the records of iterates start..stop−1."""
        ...

    def persist(self) -> None:
        """Make everything written durable."""
        ...

    def order(self) -> None:
        """Order what was written before what is written next (a row before its count)."""
        ...

    def release_staging(self) -> None:
        """Give back the memory of the staged ring where no staged row is needed again (every row
        written and in the moments); the next update takes it back."""
        ...

    def close(self) -> None:
        """Release threads and buffers."""
        ...


class RawLog(Log):
    """Rows of raw values, one per iterate, each with its trailer. `rows` is a writer's ring of
    `staged` rows where iterates are staged (iterate t in row t % staged) before write(t)."""

    SPARSE: frozenset[str] = frozenset()  # arrays made sparse where the tier grows: none (all used)

    def __init__(self, store: Store, meta: dict, ident: int, staged: int = 0) -> None:
        self.store, self.ident = store, ident
        self.n_params, self.dtype = meta["n_params"], np.dtype(meta["dtype"])
        self.slots, self.row_len = meta["capacity"] + 1, meta["row_len"]
        # on a tier whose arrays are the data in RAM (Store.in_place) a writer stages each row in
        # its own slot of the log: the ring is the log, and writing a row is stamping it
        self._in_place = bool(staged) and store.in_place
        if self._in_place:
            self._rows = store.array(LOG)
        else:
            self._rows = staging_ring(staged, self.row_len, self.dtype)
        self.rows = self._rows[:, : self.n_params]

    @staticmethod
    def arrays(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
        return {LOG: ((meta["capacity"] + 1, meta["row_len"]), meta["dtype"])}

    def stamp(self, t: int) -> None:
        """Put iterate t's trailer [t, digest of the values] at the end of staged row t % staged."""
        raw = self._rows[t % len(self._rows)].view(np.uint8)
        tail = np.array(
            [t, digest(raw[: self.n_params * self.dtype.itemsize], row_seed(self.ident, t))],
            np.int64,
        )
        raw[-TRAILER:] = tail.view(np.uint8)

    def write(self, t: int) -> None:
        """Write staged row t % staged, stamped, to its slot (in place: it is there)."""
        if not self._in_place:
            self.store.write_rows(LOG, t % self.slots, self._rows[t % len(self._rows)][None, :])

    def _verify(self, rows: np.ndarray, t0: int) -> tuple[int, str]:
        """How many full log `rows` (iterates t0, t0+1, ...) verify, and why the next one does
        not."""
        raw = rows.reshape(len(rows), -1).view(np.uint8)
        tails = np.ascontiguousarray(raw[:, -TRAILER:]).view(np.int64)
        nbytes = self.n_params * self.dtype.itemsize
        return self.check(
            tails, t0, lambda i: digest(raw[i, :nbytes], row_seed(self.ident, t0 + i))
        )

    def check(
        self, tails: np.ndarray, t0: int, values_digest: Callable[[int], int] | None
    ) -> tuple[int, str]:
        """How many rows whose trailers are `tails` (iterates t0, t0+1, ...) hold their iterate and,
        unless values_digest is None, the digest values_digest(i) of row i's values; why the next
        one does not."""
        for i, (t, check) in enumerate(tails):
            want = t0 + i
            if t != want:
                return (
                    i,
                    f"row of iterate {want} in {LOG} (slot {want % self.slots}) "
                    f"{_missing(int(t), want)}",
                )
            if values_digest is not None and values_digest(i) != check:
                return (
                    i,
                    f"row of iterate {want} in {LOG} (slot {want % self.slots}) fails its "
                    "checksum: it is damaged",
                )
        return len(tails), ""

    def columns(self, start: int, stop: int) -> "Columns":
        """Blocks of parameters of iterates start..stop−1, read a block of every row at a time."""
        return Columns(self, start, stop)

    def stream(self, runs: Runs, step_bytes: int = CHUNK_BYTES) -> Iterator[Batch]:
        """Batches of the iterates of `runs`, each read (into one of two reused buffers) while the
        previous one is used (the first read starts at once); the stream ends with the batch where
        a row does not verify."""
        step = max(1, step_bytes // (self.row_len * self.dtype.itemsize))
        parts, firsts = [], []  # slot ranges and their first iterates
        for t, stop in runs:
            for a, b in spans(t, stop, self.slots, step):
                parts.append((a, b))
                firsts.append(t)
                t += b - a
        if not parts:
            return iter([])
        buffers = [
            aligned_empty((max(b - a for a, b in parts), self.row_len), self.dtype)
            for _ in range(min(2, len(parts)))
        ]

        def read(i: int) -> Batch:
            a, b = parts[i]
            rows = self.store.read_rows(LOG, a, b, out=buffers[i % 2][: b - a])
            return (firsts[i], rows[:, : self.n_params], *self._verify(rows, firsts[i]))

        return _prefetched(read, len(parts))

    def discard(self, start: int, stop: int) -> bool:
        """Zero the rows of iterates start..stop−1 still in the log; whether any was."""
        zero, dropped = aligned_empty((1, self.row_len), self.dtype), False
        zero[:] = 0
        tail = TRAILER // self.dtype.itemsize  # the trailer's columns: only they are read
        for t in range(start, min(stop, start + self.slots)):
            slot = t % self.slots
            cols = self.store.read_cols(LOG, slot, slot + 1, self.row_len - tail, self.row_len)
            if int(np.ascontiguousarray(cols).view(np.int64)[0, 0]) >= start:
                self.store.write_rows(LOG, slot, zero)
                dropped = True
        return dropped

    def groups(self, start: int, stop: int, group_bytes: int) -> list[Runs]:
        """Iterates start..stop−1 as runs that each lie in one shard of the store
        (Store.shard_rows), grouped into whole shards of about `group_bytes`, oldest first."""
        R = self.store.shard_rows(LOG)
        by_shard: dict[int, Runs] = {}
        t = start
        for a, b in spans(start, stop, self.slots, self.slots):  # slot ranges, oldest iterate first
            while a < b:
                end = min(b, (a // R + 1) * R)
                by_shard.setdefault(a // R, []).append((t, t + end - a))
                t, a = t + end - a, end
        per_group = max(1, group_bytes // (R * self.row_len * self.dtype.itemsize))
        shards = sorted(by_shard)
        return [
            [run for s in shards[i : i + per_group] for run in by_shard[s]]
            for i in range(0, len(shards), per_group)
        ]

    def stored_bytes(self, start: int, stop: int) -> int:
        """Bytes of the log: its rows take their slots whether kept or not."""
        return self.store.nbytes(LOG)

    def persist(self) -> None:
        self.store.persist(LOG)

    def order(self) -> None:
        self.store.order(LOG)

    def release_staging(self) -> None:
        if not self._in_place:  # in place, the ring is the log itself
            release_pages(self._rows)

    def close(self) -> None:
        """Drop the staged ring (in place: the store's array, which stays open)."""
        self._rows = np.empty((0, self.row_len), self.dtype)
        self.rows = self._rows[:, : self.n_params]


class Columns:
    """Parameters [a, b) of every row of kept iterates start..stop−1 of a raw log, block after
    block: the blocks read in order and covering the values once, each row's digest is summed up
    over them and `verify` checks it (the trailers' iterates are checked at once)."""

    def __init__(self, log: RawLog, start: int, stop: int) -> None:
        self.log, self.start = log, start
        self.parts = spans(start, stop, log.slots, log.slots)
        width = TRAILER // log.dtype.itemsize
        tails = [
            log.store.read_cols(LOG, a, b, log.row_len - width, log.row_len) for a, b in self.parts
        ]
        self.tails = np.ascontiguousarray(np.concatenate(tails)).view(np.int64).reshape(-1, 2)
        self.digests = [Digest(row_seed(log.ident, t)) for t in range(start, stop)]
        self.at = 0  # the parameter the next block starts at

    def read(self, a: int, b: int) -> np.ndarray:
        """Parameters a..b−1 (a: where the block before ended) of every row, (rows, b − a)."""
        if a != self.at or b > self.log.n_params:
            raise ValueError(f"blocks are read in order: the next starts at {self.at}, not {a}")
        out = aligned_empty((len(self.digests), b - a), self.log.dtype)
        done = 0
        for s0, s1 in self.parts:
            self.log.store.read_cols(LOG, s0, s1, a, b, out[done : done + s1 - s0])
            done += s1 - s0
        for d, row in zip(self.digests, out, strict=True):
            d.update(row)
        self.at = b
        return out

    def verify(self) -> tuple[int, str]:
        """How many rows verify, and why the next does not: before any block is read, their
        iterates only; once every parameter is read, their digests too."""
        whole = self.at == self.log.n_params
        digests = (lambda i: self.digests[i].value()) if whole else None
        return self.log.check(self.tails, self.start, digests)


class DeltaLog(Log):
    """Compressed records of XOR-deltas in a ring of blocks, with an index of where each lies;
    iterates are staged in `rows` as for RawLog."""

    FIELDS = (
        7  # index row: t, first block, bytes, keyframe, record digest, values digest, row digest
    )
    SPARSE = frozenset({LOG})  # the records take space as they are written

    def __init__(self, store: Store, meta: dict, ident: int, staged: int = 0) -> None:
        self.store, self.ident = store, ident
        self.n_params, self.dtype = meta["n_params"], np.dtype(meta["dtype"])
        self.chunk, self.record_blocks = meta["chunk"], meta["record_blocks"]
        self.slots = meta["capacity"] + self.chunk
        self.blocks = self.slots * self.record_blocks
        self.codec = DeltaCodec(meta["codec"], self.dtype, self.n_params)
        self.rows = staging_ring(staged, self.n_params, self.dtype)
        self._prev = np.empty(
            self.n_params, self.dtype
        )  # the iterate written last, the next one's base
        self._base = self._prev  # where a restart decodes the base (never a staged row)
        self._prev_t: int | None = (
            None  # which iterate _prev holds (None: the next write is a keyframe)
        )
        self._key = self._pos = 0  # keyframe of the open chunk; the block the next record starts on
        self._buf: np.ndarray | None = None  # the record being written, whole blocks
        self._keys: list[tuple[int, int]] = []  # (keyframe, first block) of chunks not released
        self._freed = 0  # blocks before this one (counting from the log's start) are released

    @staticmethod
    def arrays(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
        slots = meta["capacity"] + meta["chunk"]
        return {
            LOG: ((slots * meta["record_blocks"], BLOCK), "uint8"),
            INDEX: ((slots, DeltaLog.FIELDS), "int64"),
        }

    # ---- writing ------------------------------------------------------------------------
    def stamp(self, t: int) -> None:
        """Nothing: a record is a delta of the iterate written before it, so write(t) encodes it."""

    def write(self, t: int) -> None:
        """Encode staged row t % staged as iterate t (a delta of iterate t−1, or a keyframe), write
        its record, then its index row."""
        if self._prev_t != t - 1:
            self._restart(t)
        row = self.rows[t % len(self.rows)]
        delta = self._prev_t == t - 1 and t - self._key < self.chunk
        key = self._key if delta else t
        parts = self.codec.encode(row, self._prev if delta else None)
        if self._buf is None:
            self._buf = aligned_empty((self.record_blocks, BLOCK), np.uint8)
        flat, at = self._buf.reshape(-1), 0
        for part in parts:
            flat[at : at + len(part)] = np.frombuffer(part, np.uint8)
            at += len(part)
        n_blocks = blocks_of(at)
        flat[at : n_blocks * BLOCK] = 0
        seed = row_seed(self.ident, t)
        head = [t, self._pos, at, key, digest(flat[:at], seed), digest(row.view(np.uint8), seed)]
        blocks = spans(self._pos, self._pos + n_blocks, self.blocks, n_blocks)
        for a, b in blocks:  # the room first: a full tier refuses the record before it is written
            self.store.allocate(LOG, a, b)
        done = 0
        for a, b in blocks:
            self.store.write_rows(LOG, a, self._buf[done : done + b - a])
            done += b - a
        index = np.array(head, np.int64)
        self.store.write_rows(
            INDEX, t % self.slots, np.append(index, digest(index, self.ident))[None]
        )
        self._prev = row  # the base of iterate t + 1, staged over only by iterate t + staged
        if key == t:
            self._keys.append((t, self._pos))
        self._prev_t, self._key, self._pos = t, key, self._pos + n_blocks
        self._release(t - self.slots + self.chunk)

    def _release(self, oldest: int) -> None:
        """Release the blocks before the chunk of iterate `oldest`, the oldest a posterior that
        has not counted the record just written keeps (a refused record leaves it that posterior),
        back to the last ring's worth of blocks (older positions hold newer records now)."""
        i = bisect.bisect_right(self._keys, (oldest, math.inf)) - 1  # the chunk `oldest` is in
        if i < 0:
            return
        keep, lo = self._keys[i][1], max(self._freed, self._pos - self.blocks)
        for a, b in spans(lo, keep, self.blocks, self.blocks):
            self.store.release(LOG, a, b)
        self._freed = max(self._freed, keep)
        del self._keys[:i]

    def _restart(self, t: int) -> None:
        """Find where iterate t's record goes and its base (after a reopen, recovery or truncate):
        after iterate t−1's record, with that iterate decoded; a keyframe when t−1 is gone."""
        self._prev_t, self._pos, self._prev, self._keys = None, 0, self._base, []
        if t == 0:
            return
        index = self._index(0, self.slots)
        valid = [r for r in index if self._valid(r)]
        self._pos = max((record_end(r) for r in valid), default=0)
        self._keys = sorted((int(r[0]), int(r[1])) for r in valid if r[0] == r[3] and r[0] < t)
        self._freed = 0  # _release goes back a ring's worth: whatever lies outside the records kept
        for _, values, ok, _ in self.stream([(t - 1, t)]):
            if ok:
                row = index[(t - 1) % self.slots]
                self._prev[:] = values[-1]
                self._prev_t, self._key, self._pos = t - 1, int(row[3]), record_end(row)

    def discard(self, start: int, stop: int) -> bool:
        """Zero the index rows of iterates start..stop−1 still in the log (their records are then
        unreachable); whether any was."""
        dropped = False
        for t in range(start, min(stop, start + self.slots)):
            row = self.store.read_rows(INDEX, t % self.slots, t % self.slots + 1)
            if row[0, 0] >= start:
                self.store.write_rows(INDEX, t % self.slots, np.zeros_like(row))
                dropped = True
        if dropped and self._prev_t is not None and self._prev_t >= start:
            self._prev_t = None
        return dropped

    # ---- reading ------------------------------------------------------------------------
    def _index(self, start: int, stop: int) -> np.ndarray:
        """Index rows of iterates start..stop−1 (of slots, when stop − start = slots), in order."""
        parts = [
            self.store.read_rows(INDEX, a, b) for a, b in spans(start, stop, self.slots, self.slots)
        ]
        return np.concatenate(parts) if parts else np.empty((0, self.FIELDS), np.int64)

    def _valid(self, row: np.ndarray) -> bool:
        return row.any() and int(row[6]) == digest(np.ascontiguousarray(row[:6]), self.ident)

    def _check_index(self, index: np.ndarray, t0: int) -> tuple[int, str]:
        """How many index rows (of iterates t0, t0+1, ...) are whole and name their iterate, and
        why not the next."""
        for i, row in enumerate(index):
            want = t0 + i
            where = f"record of iterate {want} in {INDEX} (slot {want % self.slots})"
            if not row.any():
                return i, f"{where} was not written (or was dropped by truncate)"
            if not self._valid(row):
                return i, f"{where} fails its checksum: it is damaged"
            if row[0] != want:
                return i, f"{where} {_missing(int(row[0]), want)}"
            if not (
                0 <= row[2] <= self.record_blocks * BLOCK and want - self.chunk < row[3] <= want
            ):
                return i, f"{where} points outside the log: it is damaged"
        return len(index), ""

    def stream(self, runs: Runs, step_bytes: int = CHUNK_BYTES // 4) -> Iterator[Batch]:
        """Batches of the iterates of `runs`, one run after the other (the next run's reads start
        when it is reached): see _run."""
        return itertools.chain.from_iterable(self._run(t0, t1, step_bytes) for t0, t1 in runs)

    def _run(self, start: int, stop: int, step_bytes: int) -> Iterator[Batch]:
        """Batches of iterates start..stop−1 decoded from the keyframe before `start`: each batch's
        records are read while the batch before is decoded, which happens while the one before that
        is used (smaller batches than raw rows', so the three stages overlap sooner); the stream
        ends with the batch where a row does not verify."""
        index = self._index(start, stop)
        ok, why = self._check_index(index, start)
        index, first = index[:ok], start
        if (
            ok and index[0, 3] < start
        ):  # decode from the keyframe: rows before `start` are only bases
            key = int(index[0, 3])
            head = self._index(key, start)
            n, why_key = self._check_index(head, key)
            if n < len(head):
                index, why = (
                    index[:0],
                    f"iterate {start} cannot be decoded from its keyframe: {why_key}",
                )
            else:
                index, first = np.concatenate([head, index]), key
        batches = self._batches(index, step_bytes)
        if not batches:
            return iter([(start, np.empty((0, self.n_params), self.dtype), 0, why)] if why else [])
        per = max(hi - lo for lo, hi in batches)
        out = [np.empty((per, self.n_params), self.dtype) for _ in range(min(2, len(batches)))]
        prev = np.empty(self.n_params, self.dtype)  # the last row decoded: the next one's base

        def fetch(
            i: int,
        ) -> np.ndarray:  # on the I/O thread: a batch's records, while the one before is decoded
            rows = index[slice(*batches[i])]
            a, b = int(rows[0, 1]), record_end(rows[-1])
            return np.concatenate(
                [self.store.read_rows(LOG, x, y) for x, y in spans(a, b, self.blocks, b - a)]
            )

        io = ThreadPoolExecutor(1)
        fetched = {0: io.submit(fetch, 0)}

        def read(i: int) -> Batch:  # on the decoding thread, while the batch before is used
            lo, hi = batches[i]
            rows, values = index[lo:hi], out[i % 2][: hi - lo]
            a = int(rows[0, 1])
            flat = fetched.pop(i).result().reshape(-1)
            if i + 1 < len(batches):
                fetched[i + 1] = io.submit(fetch, i + 1)
            n, fail = 0, ""
            for t, pos, nbytes, key, d_rec, d_val, _ in rows:
                at = (int(pos) - a) * BLOCK
                fail = self._decode(
                    flat[at : at + int(nbytes)],
                    values[n],
                    None if key == t else prev,
                    int(t),
                    int(d_rec),
                    int(d_val),
                )
                if fail:
                    break
                prev[:] = values[n]
                n += 1
            skip = max(0, start - first - lo)
            return (
                first + lo + skip,
                values[skip:],
                max(0, n - skip),
                fail or (why if i + 1 == len(batches) else ""),
            )

        return _prefetched(read, len(batches), io)

    def _decode(
        self,
        record: np.ndarray,
        out: np.ndarray,
        prev: np.ndarray | None,
        t: int,
        d_rec: int,
        d_val: int,
    ) -> str:
        """Decode one record into `out` and check it; why it fails, or ""."""
        seed = row_seed(self.ident, t)
        where = f"record of iterate {t} in {LOG}"
        if digest(record, seed) != d_rec:
            return (
                f"{where} fails its checksum: it is damaged or torn "
                "(or a newer record took its blocks)"
            )
        try:
            self.codec.decode(memoryview(record), prev, out)
        except ValueError as exc:
            return f"{where} does not decode: {exc}"
        if digest(out.view(np.uint8), seed) != d_val:
            return f"{where} decodes to values that fail their checksum: it is damaged"
        return ""

    def _batches(self, index: np.ndarray, step_bytes: int) -> list[tuple[int, int]]:
        """[lo, hi) runs of index rows whose records lie in consecutive blocks, each at most
        step_bytes decoded."""
        per = max(1, step_bytes // (self.n_params * self.dtype.itemsize))
        out, lo = [], 0
        for i in range(1, len(index) + 1):
            if i == len(index) or i - lo >= per or index[i, 1] != record_end(index[i - 1]):
                out.append((lo, i))
                lo = i
        return out

    def groups(self, start: int, stop: int, group_bytes: int) -> list[Runs]:
        """Iterates start..stop−1 as runs of whole chunks (each decoded from its keyframe) of
        about `group_bytes` of raw values, one run a group."""
        step = (
            max(1, group_bytes // (self.n_params * self.dtype.itemsize) // self.chunk) * self.chunk
        )
        cuts = [start, *range((start // step + 1) * step, stop, step), stop]
        return [[(a, b)] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def stored_bytes(self, start: int, stop: int) -> int:
        """Bytes of the records that iterates start..stop−1 need (from the keyframe before
        `start`) and of the index."""
        index = self._index(start, stop)
        if len(index) and self._valid(index[0]) and index[0, 3] < start:
            index = np.concatenate([self._index(int(index[0, 3]), start), index])
        return sum(blocks_of(r[2]) * BLOCK for r in index if self._valid(r)) + self.store.nbytes(
            INDEX
        )

    def persist(self) -> None:
        self.store.persist(LOG)
        self.store.persist(INDEX)

    def order(self) -> None:
        self.store.order(LOG)
        self.store.order(INDEX)

    def release_staging(self) -> None:
        """Nothing: the ring holds the base the next iterate's delta is taken against."""

    def close(self) -> None:
        self.codec.close()
        self.rows = self._prev = self._base = np.empty((0, self.n_params), self.dtype)


def _missing(found: int, want: int) -> str:
    """Why a slot meant for iterate `want` holds iterate `found` instead."""
    if found > want:
        return (
            f"was overwritten by iterate {found} (a running writer has moved on, or a crash "
            "kept a later row and lost the ones before it)"
        )
    return "was not written (or was dropped by truncate)"


def _prefetched(read, n: int, io: ThreadPoolExecutor | None = None) -> Iterator[Batch]:
    """read(0), read(1), ... read(n−1), each started on a thread while the one before is used;
    `io`, the pool `read` reads ahead on, is shut down with it."""
    pool = ThreadPoolExecutor(1)
    first: Future = pool.submit(read, 0)

    def batches() -> Iterator[Batch]:
        pending = first
        try:
            for i in range(n):
                batch = pending.result()
                if batch[3]:
                    yield batch
                    return
                if i + 1 < n:
                    pending = pool.submit(read, i + 1)
                yield batch
        finally:
            # without waiting: the garbage collector may finalise an abandoned stream on any
            # thread, its own reading thread included, where a join would deadlock
            pool.shutdown(wait=False, cancel_futures=True)
            if io is not None:
                io.shutdown(wait=False, cancel_futures=True)

    return batches()


def log_class(meta: dict) -> type[Log]:
    """The kind of log `meta` describes (format-3 metas without a codec: raw)."""
    return DeltaLog if meta.get("codec") else RawLog
