"""zarr tier: a zarr v3 group (local directory or any fsspec URL) so that a dask cluster can read
the posterior log where it lies.

Arrays named `*.log` are append logs, stored with zarr v3's sharding codec: rows are grouped into
shards of about `shard_bytes` (inner chunk: one row, or a few rows of a small model), so a reader
fetches one object per shard. A shard is one object, its index included, so the single writer
only ever puts *whole* shards into the log: the rows of the shard being filled (the open shard) go
elsewhere first, and a record `<name>.state` = [shard, lo, hi] says that rows lo..hi−1 of that
shard are to be read from there. In a local directory the open shard is a file
`<name>.open/shard.<n>` already in zarr's shard format (uncompressed inner chunks in order, then
their index and its crc32c, written when the file is made): each row is written once, in place,
and the complete file is made durable and linked into the log under the shard's name (an atomic
rename). Elsewhere (object stores cannot write in place) the open rows go to a side array
`<name>.open`, one object per row, and zarr writes the complete shard. Either way the open shard is
reused for the next shard only after it is in the log, and the record is rewritten before any of
its rows are; so an interrupted write never makes the store unreadable, and every row written so
far stays readable.

zarr writes each object to a temporary file and renames it into place; in a local directory
`persist` makes the objects written since the last persist and the directories above them
durable (fsync), in that order.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.errors import ZarrUserWarning

from nvmlib.backends.base import Store, aligned_empty, check_fits, open_plain, refuse_links
from nvmlib.backends.files import (
    DirectIO,
    disk_free,
    fsync_dir,
    occupied_bytes,
    os_error,
    prepare_dir,
    punch,
    read_all,
    reserve,
    write_all,
)
from nvmlib.errors import LockedError, StoreError

OPEN, STATE = ".open", ".state"
SHARD_BYTES = 128 << 20  # a shard: one object of at least ~100 MB, fetched whole by a reader
INNER_BYTES = (
    1 << 20
)  # inner chunks of at least this (a few rows of a small model), at most one shard
NO_SHARD = (-1, 0, 0)
SECTOR = 512  # bytes a device writes whole
EMPTY = 2**64 - 1  # a shard index's (offset, nbytes) of an inner chunk that is not stored


def log_layout(rows: int, row_bytes: int, shard_bytes: int = SHARD_BYTES) -> tuple[int, int]:
    """(rows per shard, rows per inner chunk) of a log of `rows` rows of `row_bytes` bytes."""
    inner = int(min(rows, max(1, min(INNER_BYTES, shard_bytes) // row_bytes)))
    shard = int(min(rows, max(1, shard_bytes // row_bytes)))
    shard = max(inner, shard // inner * inner)
    return shard, inner


def shard_chunk_bytes(log: zarr.Array) -> int:
    """Bytes of one inner chunk of the sharded array `log` (uncompressed)."""
    return log.chunks[0] * log.shape[1] * log.dtype.itemsize


def shard_index(log: zarr.Array, rows: int) -> bytes:
    """The index zarr reads at the end of a shard of `log` whose first `rows` rows are stored as
    whole uncompressed inner chunks, in order from offset 0: (offset, nbytes) uint64 pairs, then
    their crc32c (zarr v3 sharding codec, index_location "end")."""
    codec = log.metadata.codecs[0]
    plain = (
        isinstance(codec, ShardingCodec)
        and codec.index_location.value == "end"
        and [type(c) for c in codec.codecs] == [BytesCodec]
        and [type(c) for c in codec.index_codecs] == [BytesCodec, Crc32cCodec]
        and all(
            c.endian is None or c.endian.value == "little"
            for c in (codec.codecs[0], codec.index_codecs[0])
        )
    )
    if not plain:
        raise StoreError(
            f"{log.name} was not made by nvmlib's zarr tier (its shards are {codec}); "
            "append to it with zarr itself, or create the posterior with nvmlib"
        )
    inner, size = log.chunks[0], shard_chunk_bytes(log)
    index = np.full((log.shards[0] // inner, 1, 2), EMPTY, dtype="<u8")
    stored = -(-rows // inner)
    index[:stored, 0, 0] = np.arange(stored) * size
    index[:stored, 0, 1] = size
    raw = index.tobytes()
    return raw + np.array([google_crc32c.value(raw)], dtype="<u4").tobytes()


class ZarrStore(Store):
    """Arrays in a zarr v3 group; `url` may be a directory or e.g. "s3://bucket/posterior"
    (`storage_options` go to fsspec: credentials, endpoint...)."""

    kind = "zarr"
    grows = True  # a log's shards are written as they fill; release deletes whole ones
    shared = True  # a dask worker opens it by its URL

    def __init__(
        self,
        path: str | Path | None = None,
        readonly: bool = False,
        storage_options: dict | None = None,
        shard_bytes: int = SHARD_BYTES,
    ) -> None:
        if path is None:
            raise StoreError(
                "the zarr tier needs a directory or URL: open_store('zarr', 'posterior.zarr')"
            )
        self.local = "://" not in str(path)
        self.url = str(Path(path).expanduser().absolute()) if self.local else str(path)
        self.storage_options = None if self.local else storage_options
        if (
            self.url.startswith("file://") and not readonly
        ):  # fsspec's local files: make the directory
            self.storage_options = {"auto_mkdir": True, **(storage_options or {})}
        self.shard_bytes = int(shard_bytes)
        super().__init__(prepare_dir(Path(self.url), readonly) if self.local else None, readonly)
        try:
            self.group = zarr.open_group(
                self.url, mode="r" if readonly else "a", storage_options=self.storage_options
            )
        except (OSError, ValueError) as exc:  # zarr's not-found errors are both
            raise StoreError(
                f"cannot open the zarr store {self.url}: {type(exc).__name__}: {exc}; check "
                "the URL (and its storage_options: credentials, endpoint)"
            ) from exc
        except ImportError as exc:
            raise StoreError(
                f"the zarr store {self.url} needs {exc.name!r}: pip install it "
                "(s3fs for s3://, gcsfs for gs://, adlfs for az://)"
            ) from exc
        if self.local and not readonly:
            refuse_links(self.path)
        self._arrays: dict[str, zarr.Array] = {}
        self._open: dict[str, np.ndarray] = {}  # log -> the writer's copy of its open shard
        self._written: dict[
            str, tuple[int, int, int]
        ] = {}  # log -> its record, as this writer wrote it
        self._flushed: set[str] = set()  # logs whose open shard this writer has written to the log
        self._held: set[str] = set()
        self._fds: dict[
            str, tuple[int, int, DirectIO | None]
        ] = {}  # log -> (open shard, the writer's descriptors of its file)
        self._small: dict[
            tuple[str, int], tuple[int, Path, tuple[int, ...], np.dtype]
        ] = {}  # see _write_small
        self._logs: dict[str, tuple[int, int, int] | None] = {}  # see _log
        # array -> files written since persist; the writer's thread notes files while the
        # journal's thread persists, so both go through _note / _take under this lock
        self._dirty: dict[str, set[Path]] = {}
        self._dirty_lock = threading.Lock()
        self._synced: set[Path] = set()  # directories whose own entry is durable

    # ---- arrays -------------------------------------------------------------------------
    def create(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        self._check_new(name, shape, dtype)
        chunks = (1,) + tuple(shape[1:]) if len(shape) > 1 else tuple(shape)
        self.group.create_array(
            name, shape=tuple(shape), dtype=dtype, chunks=chunks, compressors=None, fill_value=0
        )
        self._sync_new(name)

    def create_log(
        self, name: str, shape: tuple[int, int], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        """A log in whole shards (about shard_bytes each), written row after row beside them in an
        open shard that is sealed when it fills (see write_rows); its rows take their space as
        they are written, so a sparse log is checked for room row by row, not here."""
        self._check_new(name, shape, dtype, check_room=not sparse)
        rows, cols = shape
        shard, inner = log_layout(rows, cols * np.dtype(dtype).itemsize, self.shard_bytes)
        self.group.create_array(
            name + OPEN,
            shape=(shard, cols),
            dtype=dtype,
            chunks=(1, cols),
            compressors=None,
            fill_value=0,
        )
        self.group.create_array(
            name + STATE, shape=(3,), dtype="int64", chunks=(3,), fill_value=0, compressors=None
        )  # 24 plain bytes, rewritten in place (see _set_state)
        self.group[name + STATE][:] = NO_SHARD
        self._mark(name + STATE, 0, 1)
        self.group.create_array(
            name,
            shape=(rows, cols),
            dtype=dtype,
            chunks=(inner, cols),
            shards=(shard, cols),
            compressors=None,
            fill_value=0,
        )
        for key in (name + OPEN, name + STATE, name):
            self._sync_new(key)

    def _check_new(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, check_room: bool = True
    ) -> None:
        self._check_writable()
        if name in self:
            raise StoreError(f"array {name!r} already exists in {self.url}")
        if check_room:
            check_fits(self, int(np.prod(shape)) * np.dtype(dtype).itemsize, f"array {name!r}")

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
        # zarr warns of objects that are no arrays: the writer's marker (see lock), a train state
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Object at .* is not recognized", ZarrUserWarning)
            keys = set(self.group.array_keys())
        return sorted(
            k for k in keys if not (k.endswith((OPEN, STATE)) and k.rsplit(".", 1)[0] in keys)
        )

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of the arrays, a log's side array and record included."""
        names = [name] if name is not None else self.names()
        aux = [n + suffix for n in names for suffix in (OPEN, STATE) if n + suffix in self.group]
        return sum(Store.nbytes(self, n) for n in names + aux)

    def delete(self, name: str) -> None:
        self._close_fd(name)
        self._logs.pop(name, None)
        for key in (name, name + OPEN, name + STATE):
            self._close_small(key)
            self._arrays.pop(key, None)
            self._take(key)
            if key in self.group:
                del self.group[key]
        for cache in (self._open, self._written):
            cache.pop(name, None)
        self._flushed.discard(name)
        if self.local:
            fsync_dir(self.path)

    def release(self, name: str, start: int, stop: int) -> None:
        """Hand back the space of rows start..stop−1 of a local log (they read as zeros): the
        shards wholly inside are deleted, the rows of others punched out of their files. Nothing
        elsewhere (an object store rewrites whole objects)."""
        log = self._log(name)
        if not self.local or log is None:
            return
        R, row_bytes, current = log[0], log[2], (self._written.get(name) or self._state(name))[0]
        for shard in range(start // R, (stop - 1) // R + 1 if stop > start else 0):
            a, b = max(start, shard * R) - shard * R, min(stop, (shard + 1) * R) - shard * R
            file = self._shard_file(name, shard)
            if a == 0 and b == self._rows_in(name, shard) and shard != current:
                file.unlink(missing_ok=True)
                continue
            # in nvmlib's layout (uncompressed rows in order) part of a shard is a byte range of
            # its file, and of the open shard's, whose rows are read from there
            for path in (file, self._open_file(name, shard)) if shard == current else (file,):
                if path.exists():
                    fd = open_plain(path, os.O_RDWR, one_name=False)
                    try:
                        punch(fd, a * row_bytes, (b - a) * row_bytes, path)
                    finally:
                        os.close(fd)

    def occupied(self, name: str) -> int:
        if not self.local:
            return self.nbytes(name)
        keys = [self.path / key for key in (name, name + OPEN, name + STATE)]
        return occupied_bytes(*(p for key in keys for p in key.rglob("*") if p.is_file()))

    def shard_rows(self, name: str) -> int:
        """Rows per shard of log `name` (1 for arrays that are not sharded logs)."""
        log = self._log(name)
        return log[0] if log else 1

    def reopen_args(self) -> tuple[str, str, dict]:
        return self.kind, self.url, {"storage_options": self.storage_options}

    # ---- the log: whole shards, the open one beside them ----------------------------------
    def _state(self, name: str) -> tuple[int, int, int]:
        shard, lo, hi = (int(v) for v in self.array(name + STATE)[:])
        return shard, lo, hi

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        try:
            self._write_rows(name, start, rows)
        except OSError as exc:  # zarr's own writes (a full disk, a quota): in the tier's terms
            raise os_error(exc, f"{self.url}/{name}", "writing", rows.nbytes) from exc

    def write_flat(self, name: str, start: int, values: np.ndarray) -> None:
        self._close_small(name)  # zarr replaces the chunk file
        shape = self.shape(name)
        try:
            super().write_flat(name, start, values)
        except OSError as exc:
            raise os_error(exc, f"{self.url}/{name}", "writing", values.nbytes) from exc
        if len(shape) == 1:
            return self._mark(name, start, start + len(values))
        row = start // int(np.prod(shape[1:]))  # along the first axis, as zarr chunks it
        self._mark(name, row, row + 1)

    def _write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        if self._log(name) is None:
            if not self._write_small(name, start, rows):
                self._close_small(name)  # zarr replaces (or drops) the chunk files
                super().write_rows(name, start, rows)
                self._mark(name, start, start + len(rows))
            return
        self._check_writable()
        if start < 0 or start + len(rows) > self._log(name)[1]:
            raise StoreError(
                f"rows {start}..{start + len(rows)} are outside {name!r} of "
                f"{self._log(name)[1]} rows"
            )
        for i, row in enumerate(rows):
            self._append(name, start + i, row)

    def _append(self, name: str, row_index: int, row: np.ndarray) -> None:
        """Write one row of a sharded log: to the open shard, which joins the log when complete."""
        shard, i = divmod(row_index, self.shard_rows(name))
        current, lo, hi = self._written.get(name) or self._state(name)
        if (
            current != shard or not lo <= i <= hi or self._published(name, current)
        ):  # a new open shard (or a jump within one)
            if current >= 0:
                self._flush(name, current, lo, hi)
            self._set_state(name, shard, i, i)  # before the open rows are overwritten
            self._begin(name, shard)
            lo, hi = i, i
        elif (
            not self.local and name not in self._open
        ):  # a writer reopened mid-shard: take the side rows back
            self._load(name, lo, hi)
        self._put(name, shard, i, row[None])
        self._flushed.discard(name)
        hi = max(hi, i + 1)
        self._set_state(name, shard, lo, hi)
        if lo == 0 and hi == self._rows_in(name, shard):  # complete: it joins the log whole
            self._flush(name, shard, lo, hi)

    def _log(self, name: str) -> tuple[int, int, int] | None:
        """(rows per shard, rows, bytes per row) of sharded log `name`; None for other arrays."""
        if name not in self._logs:
            arr = self.array(name)
            self._logs[name] = (
                None
                if arr.shards is None
                else (arr.shards[0], arr.shape[0], arr.shape[1] * arr.dtype.itemsize)
            )
        return self._logs[name]

    def _rows_in(self, name: str, shard: int) -> int:
        """Rows of the log in shard `shard` (the last shard may hold fewer)."""
        R, rows, _ = self._log(name)
        return min(R, rows - shard * R)

    def _set_state(self, name: str, shard: int, lo: int, hi: int) -> None:
        record = np.array([shard, lo, hi], dtype="int64")
        if not self._write_small(name + STATE, 0, record):
            self._close_small(name + STATE)
            self.array(name + STATE)[:] = record
            self._mark(name + STATE, 0, 1)
        self._written[name] = (shard, lo, hi)

    def _write_small(self, key: str, start: int, rows: np.ndarray) -> bool:
        """Rewrite one whole chunk of at most a sector (a count, a record) in place with one
        pwrite, where it is stored plain in a local file that exists; False where zarr must write.
        Atomic like zarr's rename: a process dies before or after a system call, and a power loss
        tears no 512-byte sector; and far cheaper for what is rewritten on every update."""
        if (key, start) not in self._small:
            arr = self.array(key)
            if (
                not self.local
                or arr.shards is not None
                or rows.shape != arr.chunks
                or start % arr.chunks[0]
            ):
                return False
            if rows.nbytes > SECTOR or [type(c) for c in arr.metadata.codecs] != [BytesCodec]:
                return False
            file = (
                self.path
                / key
                / arr.metadata.encode_chunk_key((start // arr.chunks[0],) + (0,) * (rows.ndim - 1))
            )
            if not file.exists():  # never written (or zarr dropped it as all fill value)
                return False
            self._small[key, start] = (
                open_plain(file, os.O_WRONLY),
                file,
                rows.shape,
                arr.dtype.newbyteorder("<"),
            )
        fd, file, shape, dtype = self._small[key, start]
        if rows.shape != shape:
            return False
        try:
            write_all(fd, memoryview(np.ascontiguousarray(rows, dtype=dtype)).cast("B"), 0)
        except OSError as exc:
            raise os_error(exc, file, "writing") from exc
        self._note(key, [file])
        return True

    def _open_file(self, name: str, shard: int) -> Path:
        """A local log's open shard: a file in zarr's shard format inside the side array's
        directory."""
        return self.path / (name + OPEN) / f"shard.{shard}"

    def _shard_file(self, name: str, shard: int) -> Path:
        """A local log's shard `shard`, where zarr reads it."""
        return self.path / name / self.array(name).metadata.encode_chunk_key((shard, 0))

    def _published(self, name: str, shard: int) -> bool:
        """Whether open shard `shard` is in the log already (linked by this writer, or, for a writer
        that reopened it, by one before): its file is then the shard's and is never written
        again."""
        if name not in self._flushed and self.local and self._fds.get(name, (None,))[0] != shard:
            try:
                if os.path.samefile(self._open_file(name, shard), self._shard_file(name, shard)):
                    self._flushed.add(name)
            except FileNotFoundError:
                pass
        return name in self._flushed

    def _begin(self, name: str, shard: int) -> None:
        """Start open shard `shard` (its record already names it): locally a fresh file in the shard
        format, its index written at once (the rows' places in it are fixed)."""
        if not self.local:
            log = self.array(name)
            self._open[name] = np.empty((self.shard_rows(name), log.shape[1]), log.dtype)
            return
        self._close_fd(name)
        path = self._open_file(name, shard)
        for old in path.parent.glob(
            "shard.*"
        ):  # the previous open shard: in the log already, or dropped
            old.unlink()
        index = shard_index(self.array(name), self._rows_in(name, shard))
        size = self._rows_in(name, shard) * self._log(name)[2]
        size += -size % shard_chunk_bytes(self.array(name))  # the last inner chunk whole
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            reserve(fd, size, len(index), path)  # the rows take their blocks when written (_put)
            write_all(fd, memoryview(index), size)
        except (
            OSError,
            StoreError,
        ) as exc:  # a full disk: no half-made shard file is left to be read
            os.close(fd)
            path.unlink()
            raise (
                exc
                if isinstance(exc, StoreError)
                else os_error(exc, path, "starting the open shard", size + len(index))
            ) from exc
        self._fds[name] = (shard, fd, DirectIO.open(path, readonly=False), path)
        self._note(name + OPEN, [path])

    def _fd(self, name: str, shard: int) -> tuple[int, DirectIO | None, Path]:
        """The writer's descriptors (buffered, O_DIRECT or None) of open shard `shard`, and its
        file; a writer reopened mid-shard opens it again (or starts it, when a crash came between
        its record and its file)."""
        if self._fds.get(name, (None,))[0] != shard:
            self._close_fd(name)
            path = self._open_file(name, shard)
            if path.exists():
                # a complete open shard is also linked into the log, by this tier (see _flush)
                self._fds[name] = (
                    shard,
                    open_plain(path, os.O_RDWR, one_name=False),
                    DirectIO.open(path, readonly=False, one_name=False),
                    path,
                )
            else:
                # rows the record names that are not in a file lie in the side array (see
                # _open_rows)
                self._begin(name, shard)
                _, lo, hi = self._written.get(name) or self._state(name)
                if lo < hi:
                    self._put(name, shard, lo, np.asarray(self.array(name + OPEN)[lo:hi]))
        return self._fds[name][1:]

    def _close_fd(self, name: str) -> None:
        """Close the writer's descriptors of the open shard of log `name`."""
        if name in self._fds:
            _, fd, direct, _ = self._fds.pop(name)
            os.close(fd)
            if direct is not None:
                direct.close()

    def _close_small(self, key: str | None = None) -> None:
        """Close the descriptors of array `key`'s small chunks (of every array: None)."""
        for slot in [s for s in self._small if key is None or s[0] == key]:
            os.close(self._small.pop(slot)[0])

    def _put(self, name: str, shard: int, i: int, rows: np.ndarray) -> None:
        """Rows i.. of open shard `shard`: written in place into its file (locally), else to the
        side array and the writer's copy."""
        if not self.local:
            self._open[name][i : i + len(rows)] = rows
            self.array(name + OPEN)[i : i + len(rows)] = rows
            return self._mark(name + OPEN, i, i + len(rows))
        fd, direct, path = self._fd(name, shard)
        data = np.ascontiguousarray(
            rows, dtype=rows.dtype.newbyteorder("<")
        )  # rows have the log's dtype
        offset = i * self._log(name)[2]
        reserve(fd, offset, data.nbytes, path)  # a full disk refuses here, before writing
        try:
            if direct is not None and DirectIO.fits(offset, data.nbytes):
                direct.write(data, offset)  # the device's speed, no page cache to fill and flush
            else:
                write_all(fd, memoryview(data).cast("B"), offset)
        except OSError as exc:
            raise os_error(exc, path, "appending to the open shard") from exc
        self._note(name + OPEN, [path])

    def _load(self, name: str, lo: int, hi: int) -> None:
        log = self.array(name)
        self._open[name] = np.empty((self.shard_rows(name), log.shape[1]), log.dtype)
        self._open[name][lo:hi] = self.array(name + OPEN)[lo:hi]

    def _flush(self, name: str, shard: int, lo: int, hi: int) -> None:
        """Make rows lo..hi−1 of the open shard part of the log, unless this writer already did; a
        reopened writer does it again (it may have been cut off). Locally the open file, once the
        log's other rows of that shard are copied in, is made durable and linked in place of the
        shard (an atomic rename), so the log never holds half a shard; elsewhere zarr writes it
        (merging a partial one)."""
        if lo == hi or self._published(name, shard):
            return
        R = self.shard_rows(name)
        if not self.local:
            if name not in self._open:
                self._load(name, lo, hi)
            self.array(name)[shard * R + lo : shard * R + hi] = self._open[name][lo:hi]
            self._mark(name, shard * R + lo, shard * R + hi)
        else:
            for a, b in ((0, lo), (hi, self._rows_in(name, shard))):  # a partial shard
                if a < b:
                    cols = self.array(name).shape[1]
                    rows = aligned_empty((b - a, cols), self.array(name).dtype)
                    self._read_shard(name, shard, a, b, 0, cols, rows)
                    for x, y in _runs(rows.reshape(b - a, -1).any(1)):  # rows of zeros stay holes
                        self._put(name, shard, a + x, rows[x:y])
            target = self._shard_file(name, shard)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.fsync(self._fd(name, shard)[0])  # the rows, before the link that publishes them
            temp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
            os.link(self._open_file(name, shard), temp)
            os.replace(temp, target)
            self._sync_dirs([target])  # durable before the record moves on from this shard
        self._flushed.add(name)

    def publish(self, name: str) -> None:
        """Put the open shard of log `name` into the log (the shard's other rows copied in, made
        durable, linked; then the record names no open shard), so that plain zarr reads every row
        nvmlib reads. The next row written to that shard starts a new open shard."""
        self._check_writable()
        if self._log(name) is None:
            return
        shard, lo, hi = self._written.get(name) or self._state(name)
        if shard < 0:
            return
        self._flush(name, shard, lo, hi)
        self._set_state(name, *NO_SHARD)
        self.persist(name)
        if self.local:
            self._close_fd(name)
            self._open_file(name, shard).unlink(missing_ok=True)

    def read_rows(
        self, name: str, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        if self._log(name) is None:
            return super().read_rows(name, start, stop, out)
        return self._read_log(name, start, stop, 0, self.array(name).shape[1], out)

    def read_cols(
        self, name: str, start: int, stop: int, col0: int, col1: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        if self._log(name) is None:
            return super().read_cols(name, start, stop, col0, col1, out)
        return self._read_log(name, start, stop, col0, col1, out)

    def _read_log(
        self, name: str, start: int, stop: int, c0: int, c1: int, out: np.ndarray | None
    ) -> np.ndarray:
        """Rows start..stop−1, columns c0..c1−1, of log `name`: from its shards, and from the open
        shard for the rows its record names."""
        R = self.shard_rows(name)
        if out is None:
            out = aligned_empty((stop - start, c1 - c0), self.array(name).dtype)
        for _ in range(100):  # the writer may move on to the next shard while we read: read again
            state = self._state(name)
            for shard in range(start // R, (stop - 1) // R + 1 if stop > start else 0):
                a, b = max(start, shard * R), min(stop, (shard + 1) * R)
                self._read_shard(
                    name, shard, a - shard * R, b - shard * R, c0, c1, out[a - start : b - start]
                )
            shard, lo, hi = state
            a, b = max(start, shard * R + lo), min(stop, shard * R + hi)
            if shard >= 0 and a < b:
                out[a - start : b - start] = self._open_rows(
                    name, shard, a - shard * R, b - shard * R, c0, c1
                )
            if self._state(name)[0] == shard:
                return out
        raise StoreError(
            f"{name} on {self.describe()} kept changing shards while it was read; retry"
        )

    def _read_shard(
        self, name: str, shard: int, a: int, b: int, c0: int, c1: int, out: np.ndarray
    ) -> None:
        """Rows a..b−1 (columns c0..c1−1) of shard `shard` of the log into `out`. A local shard in
        the layout this tier writes (its index says so) is read at the rows' offsets with O_DIRECT,
        like the mmap tier's log; any other through zarr."""
        R, _, row_bytes = self._log(name)
        log = self.array(name)
        if not self.local:
            out[...] = log[shard * R + a : shard * R + b, c0:c1]
            return
        file = self._shard_file(name, shard)
        index = shard_index(log, self._rows_in(name, shard))
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:  # never written: zarr's fill value
            out[...] = 0
            return
        try:
            size = os.fstat(fd).st_size
            if size < len(index) or os.pread(fd, len(index), size - len(index)) != index:
                out[...] = log[
                    shard * R + a : shard * R + b, c0:c1
                ]  # another layout: zarr reads it
                return
            # whole rows are one range; a block of columns is one range per row
            whole = c1 - c0 == log.shape[1]
            ranges = (
                [(a * row_bytes, out)]
                if whole
                else [((a + i) * row_bytes + c0 * log.dtype.itemsize, out[i]) for i in range(b - a)]
            )
            direct = None
            try:
                for offset, part in ranges:
                    if not DirectIO.fits(offset, part.nbytes):
                        read_all(fd, memoryview(part).cast("B"), offset, file)
                        continue
                    direct = direct or DirectIO.open(file, readonly=True)
                    if direct is None:
                        read_all(fd, memoryview(part).cast("B"), offset, file)
                    else:
                        direct.read(part, offset)
            finally:
                if direct is not None:
                    direct.close()
        finally:
            os.close(fd)

    def _open_rows(self, name: str, shard: int, a: int, b: int, c0: int, c1: int) -> np.ndarray:
        """Rows a..b−1 (columns c0..c1−1) of open shard `shard`: from its file, or else from the
        side array (where a writer through a URL puts them, and an older nvmlib did)."""
        log = self.array(name)
        dtype, row_bytes = log.dtype.newbyteorder("<"), self._log(name)[2]
        if self.local:
            file = self._open_file(name, shard)
            try:
                fd = os.open(file, os.O_RDONLY)
            except (
                FileNotFoundError
            ):  # the writer moved on meanwhile (read_rows reads again), or see above
                fd = None
            if fd is not None:
                rows = np.empty((b - a, c1 - c0), dtype)
                try:
                    for i in range(b - a):
                        read_all(
                            fd,
                            memoryview(rows[i]).cast("B"),
                            (a + i) * row_bytes + c0 * dtype.itemsize,
                            file,
                        )
                finally:
                    os.close(fd)
                return rows
        return self.array(name + OPEN)[a:b, c0:c1]

    # ---- durability ---------------------------------------------------------------------
    def _mark(self, key: str, start: int, stop: int) -> None:
        """Remember the objects (chunks, or shards) rows start..stop−1 of array `key` live in."""
        if not self.local or stop <= start:
            return
        meta = self.array(key).metadata
        grid = meta.chunk_grid.chunk_shape  # shards, when the array is sharded
        rest = (0,) * (len(grid) - 1)
        self._note(
            key,
            (
                self.path / key / meta.encode_chunk_key((i,) + rest)
                for i in range(start // grid[0], (stop - 1) // grid[0] + 1)
            ),
        )

    def _note(self, key: str, files: Iterable[Path]) -> None:
        """Remember that `files` of array `key` were written since its last persist."""
        with self._dirty_lock:
            self._dirty.setdefault(key, set()).update(files)

    def _take(self, *keys: str) -> set[Path]:
        """The files written to arrays `keys` since their last persist, forgotten there."""
        with self._dirty_lock:
            return set().union(*(self._dirty.pop(key, set()) for key in keys))

    def persist(self, name: str) -> None:
        """fsync the objects written to `name` (a log: its open shard and record too) since the last
        persist, then their directories, deepest first."""
        files = self._take(name + OPEN, name + STATE, name)
        try:
            for file in files:
                try:
                    _fsync_file(file)
                except FileNotFoundError:
                    # gone since it was written: an open shard the writer's thread made durable
                    # (fsync) and linked into the log, then unlinked; or an array deleted since
                    continue
            self._sync_dirs(files)
        except OSError as exc:
            self._note(name, files)  # still to be made durable
            raise os_error(exc, f"{self.url}/{name}", "flushing") from exc

    def _sync_dirs(self, files: Iterable[Path]) -> None:
        """fsync the directories `files` were renamed into, and any directory above them made since
        the last time (once each), each entry before its parent's."""
        dirs: set[Path] = set()
        for file in files:
            dirs.add(file.parent)
            for d in file.parent.parents:
                if d in self._synced or not d.is_relative_to(self.path):
                    break
                dirs.add(d)
        for d in sorted(dirs, key=lambda p: -len(p.parts)):
            if d.is_dir():
                fsync_dir(d)
        self._synced.update(dirs)

    def _sync_new(self, key: str) -> None:
        """fsync a new array's metadata and every directory from its own up to the store's
        parent."""
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
        me = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "user": getpass.getuser(),
                "writer": uuid.uuid4().hex,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()
        store = self.group.store
        key = self._marker(name)
        proto = default_buffer_prototype()
        zarr.core.sync.sync(store.set_if_not_exists(key, proto.buffer.from_bytes(me)))
        held = zarr.core.sync.sync(store.get(key, prototype=proto))
        if held is None or held.to_bytes() != me:
            holder = held.to_bytes().decode(errors="replace") if held is not None else "unknown"
            if f'"host": {json.dumps(socket.gethostname())}, "pid": {os.getpid()},' in holder:
                raise LockedError(
                    f"{name} on {self.describe()} already has a writer in this process (another "
                    "posterior or SWAG object opened on the same URL); close that one first, or "
                    "open this one read-only (readonly=True)"
                )
            raise LockedError(
                f"{name} on {self.describe()} is being written by another process ({holder}); wait "
                "for it to finish, open the posterior read-only (readonly=True), or, if that "
                f"writer died, delete the object {self.url.rstrip('/')}/{key}"
            )
        self._held.add(name)

    def unlock(self, name: str) -> None:
        if name in self._held:
            self._held.discard(name)
            zarr.core.sync.sync(self.group.store.delete(self._marker(name)))
        super().unlock(name)

    def close(self) -> None:
        for name in list(self._held):
            self.unlock(name)
        for name in list(self._fds):
            self._close_fd(name)
        self._close_small()
        self._open.clear()
        self._written.clear()
        super().close()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) ranges where `mask` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
