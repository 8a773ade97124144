"""zarr tier: a zarr v3 group (local directory or any fsspec URL) so that a dask cluster can read
the posterior log where it lies.

Arrays named `*.log` are append logs, stored with zarr v3's sharding codec: rows are grouped into
shards of about `shard_bytes` (inner chunk: one row, or a few rows of a small model), so a reader
fetches one object per shard. zarr writes a shard as one object, index included, so the single
writer only ever writes *whole* shards: the rows of the shard being filled (the open shard) go
first to a side array `<name>.open` (one object per row) and a record `<name>.state`
= [shard, lo, hi] says that rows lo..hi−1 of that shard are to be read from the side array. When the
shard is complete it is written to the log in one piece; the side array is reused for the next
shard only after that, and the record is rewritten before any of its rows are. So an interrupted
write never makes the store unreadable, and every row written so far stays readable.

zarr writes each object to a temporary file and renames it into place; in a local directory
`persist` makes the objects written since the last persist and the directories above them
durable (fsync), in that order.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.errors import ZarrUserWarning

from nvmlib.backends.base import Store, check_fits
from nvmlib.backends.files import disk_free, fsync_dir, prepare_dir
from nvmlib.errors import LockedError, StoreError

LOG_SUFFIX = ".log"
OPEN, STATE = ".open", ".state"
SHARD_BYTES = 128 << 20  # a shard: one object of at least ~100 MB, fetched whole by a reader
INNER_BYTES = 1 << 20  # inner chunks of at least this (a few rows of a small model), at most one shard
NO_SHARD = (-1, 0, 0)


def log_layout(rows: int, row_bytes: int, shard_bytes: int = SHARD_BYTES) -> tuple[int, int]:
    """(rows per shard, rows per inner chunk) of a log of `rows` rows of `row_bytes` bytes."""
    inner = int(min(rows, max(1, min(INNER_BYTES, shard_bytes) // row_bytes)))
    shard = int(min(rows, max(1, shard_bytes // row_bytes)))
    shard = max(inner, shard // inner * inner)
    return shard, inner


class ZarrStore(Store):
    """Arrays in a zarr v3 group; `url` may be a directory or e.g. "s3://bucket/posterior"
    (`storage_options` go to fsspec: credentials, endpoint...)."""

    kind = "zarr"

    def __init__(self, path: str | Path | None = None, readonly: bool = False,
                 storage_options: dict | None = None, shard_bytes: int = SHARD_BYTES) -> None:
        if path is None:
            raise StoreError("the zarr tier needs a directory or URL: open_store('zarr', 'posterior.zarr')")
        self.local = "://" not in str(path)
        self.url = str(Path(path).expanduser().absolute()) if self.local else str(path)
        self.storage_options = None if self.local else storage_options
        if self.url.startswith("file://") and not readonly:  # fsspec's local files: make the directory
            self.storage_options = {"auto_mkdir": True, **(storage_options or {})}
        self.shard_bytes = int(shard_bytes)
        super().__init__(prepare_dir(Path(self.url), readonly) if self.local else None, readonly)
        try:
            self.group = zarr.open_group(self.url, mode="r" if readonly else "a",
                                         storage_options=self.storage_options)
        except (OSError, ValueError) as exc:  # zarr's not-found errors are both
            raise StoreError(f"cannot open the zarr store {self.url}: {type(exc).__name__}: {exc}; check "
                             "the URL (and its storage_options: credentials, endpoint)") from exc
        except ImportError as exc:
            raise StoreError(f"the zarr store {self.url} needs {exc.name!r}: pip install it "
                             "(s3fs for s3://, gcsfs for gs://, adlfs for az://)") from exc
        self._arrays: dict[str, zarr.Array] = {}
        self._open: dict[str, np.ndarray] = {}  # log -> the writer's copy of its open shard
        self._written: dict[str, tuple[int, int, int]] = {}  # log -> its record, as this writer wrote it
        self._flushed: set[str] = set()  # logs whose open shard this writer has written to the log
        self._held: set[str] = set()
        self._dirty: dict[str, set[tuple[int, ...]]] = {}  # chunk (or shard) coordinates written since persist
        self._synced: set[Path] = set()  # directories whose own entry is durable

    # ---- arrays -------------------------------------------------------------------------
    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self._check_writable()
        if name in self:
            raise StoreError(f"array {name!r} already exists in {self.url}")
        check_fits(self, int(np.prod(shape)) * np.dtype(dtype).itemsize, f"array {name!r}")
        if not self._is_log(name, shape):
            chunks = (1,) + tuple(shape[1:]) if len(shape) > 1 else tuple(shape)
            self.group.create_array(name, shape=tuple(shape), dtype=dtype, chunks=chunks,
                                    compressors=None, fill_value=0)
            self._sync_new(name)
            return
        rows, cols = shape
        shard, inner = log_layout(rows, cols * np.dtype(dtype).itemsize, self.shard_bytes)
        self.group.create_array(name + OPEN, shape=(shard, cols), dtype=dtype, chunks=(1, cols),
                                compressors=None, fill_value=0)
        self.group.create_array(name + STATE, shape=(3,), dtype="int64", chunks=(3,), fill_value=0)
        self.group[name + STATE][:] = NO_SHARD
        self._mark(name + STATE, 0, 1)
        self.group.create_array(name, shape=(rows, cols), dtype=dtype, chunks=(inner, cols),
                                shards=(shard, cols), compressors=None, fill_value=0)
        for key in (name + OPEN, name + STATE, name):
            self._sync_new(key)

    @staticmethod
    def _is_log(name: str, shape: tuple[int, ...]) -> bool:
        return name.endswith(LOG_SUFFIX) and len(shape) == 2

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except KeyError:
                raise StoreError(f"{self.url} holds no array {name!r}") from None
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        return (name in self._arrays and not name.endswith((OPEN, STATE))) or name in self.names()

    def names(self) -> list[str]:
        with warnings.catch_warnings():  # zarr warns of objects that are no arrays: the writer's marker (see lock), a train state
            warnings.filterwarnings("ignore", r"Object at .* is not recognized", ZarrUserWarning)
            keys = set(self.group.array_keys())
        return sorted(k for k in keys if not (k.endswith((OPEN, STATE)) and k.rsplit(".", 1)[0] in keys))

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of the arrays, a log's side array and record included."""
        names = [name] if name is not None else self.names()
        aux = [n + suffix for n in names for suffix in (OPEN, STATE) if n + suffix in self.group]
        return sum(Store.nbytes(self, n) for n in names + aux)

    def delete(self, name: str) -> None:
        for key in (name, name + OPEN, name + STATE):
            self._arrays.pop(key, None)
            self._dirty.pop(key, None)
            if key in self.group:
                del self.group[key]
        for cache in (self._open, self._written):
            cache.pop(name, None)
        self._flushed.discard(name)
        if self.local:
            fsync_dir(self.path)

    def shard_rows(self, name: str) -> int:
        """Rows per shard of log `name` (1 for arrays that are not sharded logs)."""
        shards = self.array(name).shards
        return shards[0] if shards else 1

    # ---- the log: whole shards, the open one through the side array ---------------------
    def _state(self, name: str) -> tuple[int, int, int]:
        shard, lo, hi = (int(v) for v in self.array(name + STATE)[:])
        return shard, lo, hi

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        if self.array(name).shards is None:
            super().write_rows(name, start, rows)
            return self._mark(name, start, start + len(rows))
        self._check_writable()
        if start < 0 or start + len(rows) > self.array(name).shape[0]:
            raise StoreError(f"rows {start}..{start + len(rows)} are outside {name!r} of "
                             f"{self.array(name).shape[0]} rows")
        for i, row in enumerate(rows):
            self._append(name, start + i, row)

    def _append(self, name: str, row_index: int, row: np.ndarray) -> None:
        """Write one row of a sharded log: to the side array, and the shard when it is complete."""
        log, R = self.array(name), self.shard_rows(name)
        shard, i = divmod(row_index, R)
        current, lo, hi = self._written.get(name) or self._state(name)
        if current != shard or not lo <= i <= hi:  # a new open shard (or a jump within one)
            if current >= 0:
                self._flush(name, current, lo, hi)
            self._set_state(name, shard, i, i)  # before the side array is overwritten
            self._open.setdefault(name, np.empty((R, log.shape[1]), log.dtype))
            lo, hi = i, i
        elif name not in self._open:  # a writer reopened mid-shard: take the side rows back
            self._load(name, lo, hi)
        self._open[name][i] = row
        self.array(name + OPEN)[i:i + 1] = row[None]
        self._mark(name + OPEN, i, i + 1)
        self._flushed.discard(name)
        self._set_state(name, shard, lo, max(hi, i + 1))
        if lo == 0 and max(hi, i + 1) == min(R, log.shape[0] - shard * R):  # complete: write it whole
            self._flush(name, shard, lo, max(hi, i + 1))

    def _set_state(self, name: str, shard: int, lo: int, hi: int) -> None:
        self.array(name + STATE)[:] = (shard, lo, hi)
        self._mark(name + STATE, 0, 1)
        self._written[name] = (shard, lo, hi)

    def _load(self, name: str, lo: int, hi: int) -> None:
        log = self.array(name)
        self._open[name] = np.empty((self.shard_rows(name), log.shape[1]), log.dtype)
        self._open[name][lo:hi] = self.array(name + OPEN)[lo:hi]

    def _flush(self, name: str, shard: int, lo: int, hi: int) -> None:
        """Write rows lo..hi−1 of the open shard to the log (one object; zarr merges a partial one),
        unless this writer already did; a reopened writer does it again (it may have been cut off)."""
        if name in self._flushed:
            return
        if name not in self._open:
            self._load(name, lo, hi)
        R = self.shard_rows(name)
        self.array(name)[shard * R + lo:shard * R + hi] = self._open[name][lo:hi]
        self._mark(name, shard * R + lo, shard * R + hi)
        self._flushed.add(name)

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        log = self.array(name)
        if log.shards is None:
            return super().read_rows(name, start, stop, out)
        R = self.shard_rows(name)
        for _ in range(100):  # the writer may move on to the next shard while we read: read again
            state = self._state(name)
            out = super().read_rows(name, start, stop, out)
            shard, lo, hi = state
            a, b = max(start, shard * R + lo), min(stop, shard * R + hi)
            if shard >= 0 and a < b:
                out[a - start:b - start] = self.array(name + OPEN)[a - shard * R:b - shard * R]
            if self._state(name)[0] == shard:
                return out
        raise StoreError(f"{name} on {self.describe()} kept changing shards while it was read; retry")

    # ---- durability ---------------------------------------------------------------------
    def _mark(self, key: str, start: int, stop: int) -> None:
        """Remember the objects (chunks, or shards) rows start..stop−1 of array `key` live in."""
        if not self.local or stop <= start:
            return
        grid = self.array(key).metadata.chunk_grid.chunk_shape  # shards, when the array is sharded
        rest = (0,) * (len(grid) - 1)
        self._dirty.setdefault(key, set()).update((i,) + rest for i in range(start // grid[0], (stop - 1) // grid[0] + 1))

    def persist(self, name: str) -> None:
        """fsync the objects written to `name` (a log: its side array and record too) since the last
        persist, then their directories, deepest first."""
        dirs: set[Path] = set()
        for key in (name + OPEN, name + STATE, name):
            coords = self._dirty.pop(key, set())
            if not coords:
                continue
            meta = self.array(key).metadata
            for c in coords:
                file = self.path / key / meta.encode_chunk_key(c)
                if file.exists():
                    _fsync_file(file)
                dirs.add(file.parent)  # zarr renamed the object into it
                for d in file.parent.parents:  # and made any directory above it it lacked: once each
                    if d in self._synced or not d.is_relative_to(self.path):
                        break
                    dirs.add(d)
        for d in sorted(dirs, key=lambda p: -len(p.parts)):  # each entry before its parent's
            if d.is_dir():
                fsync_dir(d)
        self._synced.update(dirs)

    def _sync_new(self, key: str) -> None:
        """fsync a new array's metadata and every directory from its own up to the store's parent."""
        if not self.local:
            return
        file = self.path / key / "zarr.json"
        _fsync_file(file)
        for d in file.parents:
            fsync_dir(d)
            if d == self.path.parent:
                break

    # ---- the rest of the protocol --------------------------------------------------------
    def free_bytes(self) -> int | None:
        return disk_free(self.path) if self.local else None

    def describe(self) -> str:
        return f"zarr tier at {self.url}"

    def _lock_path(self, name: str) -> Path:
        return self.path.parent / f".{self.path.name}.{name}.lock"  # zarr owns the inside

    def _marker(self, name: str) -> str:
        return f"{name}.writer"

    def lock(self, name: str) -> None:
        """A file lock for a local directory; on an object store, a marker object `<name>.writer`
        naming the writer (created if absent: one writer per posterior)."""
        if self.local:
            return super().lock(name)
        if name in self._held:
            raise LockedError(f"{name} on {self.describe()} already has a writer in this process")
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "user": getpass.getuser(),
                         "writer": uuid.uuid4().hex,
                         "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        store = self.group.store
        key = self._marker(name)
        proto = default_buffer_prototype()
        zarr.core.sync.sync(store.set_if_not_exists(key, proto.buffer.from_bytes(me)))
        held = zarr.core.sync.sync(store.get(key, prototype=proto))
        if held is None or held.to_bytes() != me:
            holder = held.to_bytes().decode(errors="replace") if held is not None else "unknown"
            raise LockedError(
                f"{name} on {self.describe()} is being written by another process ({holder}); wait for "
                "it to finish, open the posterior read-only (readonly=True), or, if that writer died, "
                f"delete the object {self.url.rstrip('/')}/{key}")
        self._held.add(name)

    def unlock(self, name: str) -> None:
        if name in self._held:
            self._held.discard(name)
            zarr.core.sync.sync(self.group.store.delete(self._marker(name)))
        super().unlock(name)

    def close(self) -> None:
        for name in list(self._held):
            self.unlock(name)
        self._open.clear()
        self._written.clear()
        super().close()


def _fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
