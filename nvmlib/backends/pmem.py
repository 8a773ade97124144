"""pmem tier: persistent memory through PMDK's libpmem, in fsdax or devdax mode.

fsdax (a directory on a file system mounted with -o dax): one .npy file per array, mapped
with pmem_map_file, so `np.load(file, mmap_mode="r")` still reads them. devdax (a character
device such as /dev/dax0.0): one device holds every array, after a small table at its start
(two alternating slots, each with a sequence number and a crc32, so a torn table update
leaves the previous table valid). Rows are copied with pmem_memcpy_nodrain and made durable
with pmem_drain where pmem_is_pmem says the mapping is persistent memory, and with pmem_msync
everywhere else, so the tier also runs on any file system. On fsdax a sparse array (a compressed
log) is a file with holes; `allocate` gives rows their blocks with posix_fallocate before they are
copied in (a store into a hole of a full file system would be a SIGBUS, not an error), `release`
punches them out. A device does not grow: its arrays take their whole extent at create.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from nvmlib.backends.base import (
    ALIGN,
    Store,
    check_fits,
    flat_index,
    open_lock_file,
    open_plain,
    private_dir,
)
from nvmlib.backends.files import (
    create_npy,
    disk_free,
    fsync_dir,
    npy_header,
    occupied_bytes,
    prepare_dir,
    punch,
    reserve,
)
from nvmlib.backends.libpmem import Mapping, lib
from nvmlib.errors import StoreError

SUFFIX = ".npy"
MAGIC = b"NVMLDAX1"
SLOT_BYTES = 32 << 10  # one table slot; two of them at the start of a device
DATA_START = 2 * SLOT_BYTES  # first byte an array may use on a device
HEAD = 32  # slot header: magic, seq, length, crc32 (8 bytes each)


class Extent(NamedTuple):
    """Where an array lives in a mapping, and what it is."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def device_lock_path(device: Path, name: str) -> Path:
    """A lock file in this user's private directory, keyed by the device path (a device has no
    directory)."""
    key = str(Path(device).resolve()).strip("/").replace("/", "_")
    return private_dir() / f"{key}-{name}.lock"


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


class FileLayout:
    """fsdax: one .npy file per array in a directory, each file one mapping."""

    grows = True

    def __init__(self, path: Path, readonly: bool) -> None:
        self.path = prepare_dir(path, readonly)
        self.readonly = readonly
        self._fds: dict[str, int] = {}  # descriptors for allocate and release

    def file(self, name: str) -> Path:
        return self.path / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.path.glob(f"*{SUFFIX}"))

    def open(self, name: str) -> tuple[Mapping, Extent]:
        file = self.file(name)
        if not file.exists():
            raise StoreError(f"{self.path} holds no array {name!r}")
        os.close(
            open_plain(file, os.O_RDONLY if self.readonly else os.O_RDWR)
        )  # never map through a link
        offset, shape, dtype = npy_header(file)
        return Mapping(file, readonly=self.readonly), Extent(offset, shape, dtype)

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype, sparse: bool) -> None:
        create_npy(self.file(name), shape, dtype, preallocate=not sparse)

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = open_plain(self.file(name), os.O_RDWR)
        return self._fds[name]

    def allocate(self, name: str, offset: int, length: int) -> None:
        reserve(self._fd(name), offset, length, self.file(name))

    def release(self, name: str, offset: int, length: int) -> None:
        punch(self._fd(name), offset, length, self.file(name))

    def occupied(self, name: str, extent: Extent) -> int:
        return occupied_bytes(self.file(name))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def delete(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        self.file(name).unlink(missing_ok=True)
        fsync_dir(self.path)

    def free_bytes(self) -> int:
        return disk_free(self.path)

    def lock_path(self, name: str) -> Path:
        return self.path / f".{name}.lock"

    def describe(self) -> str:
        return f"pmem tier at {self.path}"


class DeviceLayout:
    """devdax: one mapping of the whole device, a table of extents at its start; an array takes its
    whole extent at create (a device does not grow)."""

    grows = False

    def __init__(self, path: Path, readonly: bool) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise StoreError(
                f"there is no device {self.path}: create a devdax namespace "
                "(ndctl create-namespace -m devdax) or check the path"
            )
        if not os.access(self.path, os.R_OK if readonly else os.R_OK | os.W_OK):
            raise StoreError(
                f"the device {self.path} is not "
                f"{'readable' if readonly else 'readable and writable'} by you; run `sudo chmod "
                f"go+rw {self.path}` or choose another path"
            )
        self.readonly = readonly
        self.map = Mapping(self.path, readonly=readonly)
        if self.map.length < DATA_START + ALIGN:
            raise StoreError(
                f"the device {self.path} has only {self.map.length} bytes; "
                f"a pmem device needs at least {DATA_START + ALIGN}"
            )
        self.seq, self.table = self._read()
        if self.seq == 0:
            if readonly:
                raise StoreError(f"the device {self.path} holds no nvmlib arrays; check the path")
            with self._locked():
                self.seq, self.table = self._read()
                if self.seq == 0:
                    self._write({})

    def _read(self) -> tuple[int, dict[str, Extent]]:
        """(seq, table) of the newest valid slot; (0, {}) on a device nvmlib never formatted."""
        best: tuple[int, dict[str, Extent]] = (0, {})
        raw = self.map.view(0, (DATA_START,), np.dtype(np.uint8), writeable=False)
        for slot in range(2):
            head = raw[slot * SLOT_BYTES : slot * SLOT_BYTES + HEAD]
            seq, length, crc = (int(x) for x in head[8:].view(np.uint64))
            body = raw[slot * SLOT_BYTES + HEAD : slot * SLOT_BYTES + HEAD + length].tobytes()
            if (
                head[:8].tobytes() != MAGIC
                or length > SLOT_BYTES - HEAD
                or crc != _table_crc(seq, body)
            ):
                continue
            if seq > best[0]:
                best = (seq, self._extents(json.loads(body)))
        return best

    def _extents(self, entries: dict) -> dict[str, Extent]:
        """The table's entries, each checked to lie inside the device's data area (a table with a
        valid checksum but an entry outside it is damage nvmlib must not map: StoreError)."""
        table = {}
        for name, entry in entries.items():
            try:
                offset, shape, dtype = entry
                extent = Extent(int(offset), tuple(int(n) for n in shape), np.dtype(dtype))
                ok = (
                    isinstance(offset, int)
                    and all(isinstance(n, int) and n >= 0 for n in shape)
                    and extent.offset >= DATA_START
                    and extent.offset + extent.nbytes <= self.map.length
                )
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise StoreError(
                    f"the table of {self.path} has an invalid entry for {name!r} ({entry!r}: "
                    f"outside bytes {DATA_START}..{self.map.length} of the device); the device's "
                    "table is damaged: nvmlib will not map it"
                )
            table[name] = extent
        return table

    def _write(self, table: dict[str, Extent]) -> None:
        """Write `table` into the older slot and persist it; the newer slot stays valid
        meanwhile."""
        body = json.dumps(
            {n: [e.offset, list(e.shape), e.dtype.str] for n, e in table.items()}
        ).encode()
        if len(body) > SLOT_BYTES - HEAD:
            raise StoreError(
                f"the table of {self.path} is full ({len(table)} arrays); delete some arrays"
            )
        seq = self.seq + 1
        head = np.array([seq, len(body), _table_crc(seq, body)], dtype=np.uint64)
        record = np.frombuffer(MAGIC + head.tobytes() + body, dtype=np.uint8)
        offset = (seq % 2) * SLOT_BYTES
        self.map.copy(offset, record)
        self.map.persist(offset, len(record), copied_only=True)
        self.seq, self.table = seq, dict(table)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise table updates between processes sharing the device."""
        fd = open_lock_file(device_lock_path(self.path, ".table"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def names(self) -> list[str]:
        self.seq, self.table = self._read()
        return sorted(self.table)

    def open(self, name: str) -> tuple[Mapping, Extent]:
        if name not in self.table:
            self.seq, self.table = self._read()
        if name not in self.table:
            raise StoreError(f"the device {self.path} holds no array {name!r}")
        return self.map, self.table[name]

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype, sparse: bool) -> None:
        with self._locked():
            self.seq, table = self._read()
            if name in table:
                raise StoreError(f"array {name!r} already exists on {self.path}; delete it first")
            extent = Extent(
                self._first_fit(table, int(np.prod(shape)) * dtype.itemsize), tuple(shape), dtype
            )
            self.map.zero(extent.offset, extent.nbytes)
            self._write({**table, name: extent})

    def _first_fit(self, table: dict[str, Extent], nbytes: int) -> int:
        start = DATA_START
        for e in sorted(table.values()):
            if e.offset - start >= nbytes:
                return start
            start = max(start, _round_up(e.offset + e.nbytes))
        if self.map.length - start >= nbytes:
            return start
        raise StoreError(
            f"the device {self.path} has no free extent of {nbytes / 1e9:.3f} GB "
            f"({self.free_bytes() / 1e9:.3f} GB free in pieces); delete arrays or use a larger "
            "device"
        )

    def delete(self, name: str) -> None:
        with self._locked():
            self.seq, table = self._read()
            if table.pop(name, None) is not None:
                self._write(table)

    def free_bytes(self) -> int:
        used = sum(_round_up(e.nbytes) for e in self.table.values())
        return self.map.length - DATA_START - used

    def allocate(self, name: str, offset: int, length: int) -> None:
        """Nothing to do: the extent is the array's since its create."""

    release = allocate

    def occupied(self, name: str, extent: Extent) -> int:
        return _round_up(extent.nbytes)

    def close(self) -> None:
        """The device's mapping lives as long as the store's views."""

    def lock_path(self, name: str) -> Path:
        return device_lock_path(self.path, name)

    def describe(self) -> str:
        return f"pmem tier on device {self.path}"


def _table_crc(seq: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(seq.to_bytes(8, "little")))


class PmemStore(Store):
    """Arrays on persistent memory (or any file system, with msync as the flush)."""

    kind = "pmem"

    def __init__(
        self, path: str | Path | None = None, readonly: bool = False, device: bool | None = None
    ) -> None:
        """path: an fsdax directory or a devdax device; device=True treats a regular file as a
        device."""
        if path is None:
            raise StoreError(
                "the pmem tier needs a directory on an fsdax mount or a devdax device: "
                "open_store('pmem', '/mnt/pmem0/posterior') or open_store('pmem', '/dev/dax0.0')"
            )
        path = Path(path).expanduser()
        if device is None:
            device = path.exists() and stat.S_ISCHR(path.stat().st_mode)
        self._layout = DeviceLayout(path, readonly) if device else FileLayout(path, readonly)
        self.grows = self._layout.grows  # fsdax files grow; a device's extents do not
        super().__init__(self._layout.path, readonly)
        self._open: dict[str, tuple[Mapping, Extent]] = {}
        self._dirty: dict[
            str, tuple[int, int]
        ] = {}  # byte range written by write_rows since persist
        self._exposed: set[str] = set()  # handed out writable by array(): flush it whole

    @classmethod
    def check_available(cls) -> None:
        lib()

    def _entry(self, name: str) -> tuple[Mapping, Extent]:
        if name not in self._open:
            self._open[name] = self._layout.open(name)
        return self._open[name]

    def create(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        self._check_writable()
        if name in self._layout.names():
            raise StoreError(f"array {name!r} already exists on {self.describe()}; delete it first")
        dtype = np.dtype(dtype)
        sparse = sparse and self.grows
        if not sparse:
            check_fits(self, int(np.prod(shape)) * dtype.itemsize, f"array {name!r}")
        self._layout.create(name, tuple(int(n) for n in shape), dtype, sparse)
        mapping, e = self._entry(name)
        if mapping.is_pmem and not sparse:  # page tables now, not a fault per page on the hot path
            mapping.populate(e.offset, e.nbytes)

    def _span(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """(offset in the mapping, bytes) of rows start..stop−1 of `name`."""
        e = self._entry(name)[1]
        row = e.nbytes // max(e.shape[0] if e.shape else 1, 1)
        return e.offset + start * row, (stop - start) * row

    def allocate(self, name: str, start: int, stop: int) -> None:
        self._check_writable()
        self._layout.allocate(name, *self._span(name, start, stop))

    def release(self, name: str, start: int, stop: int) -> None:
        self._check_writable()
        self._layout.release(name, *self._span(name, start, stop))

    def occupied(self, name: str) -> int:
        return self._layout.occupied(name, self._entry(name)[1])

    def array(self, name: str) -> np.ndarray:
        mapping, e = self._entry(name)
        if not self.readonly:
            self._exposed.add(name)
        return mapping.view(e.offset, e.shape, e.dtype, writeable=not self.readonly)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1].shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[1].dtype

    def names(self) -> list[str]:
        return self._layout.names()

    def delete(self, name: str) -> None:
        self._check_writable()
        for table in (self._open, self._dirty):
            table.pop(name, None)
        self._exposed.discard(name)
        self._layout.delete(name)

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        self._check_writable()
        mapping, e = self._entry(name)
        data = np.ascontiguousarray(rows, dtype=e.dtype)
        n_rows = e.shape[0] if e.shape else 1
        if start < 0 or start + len(data) > n_rows:
            raise StoreError(
                f"rows {start}..{start + len(data)} are outside {name!r} of {n_rows} rows"
            )
        self._copy_at(name, mapping, e.offset + start * (e.nbytes // max(n_rows, 1)), data)

    def write_flat(self, name: str, start: int, values: np.ndarray) -> None:
        self._check_writable()
        mapping, e = self._entry(name)
        flat_index(e.shape, start, len(values))
        data = np.ascontiguousarray(values, dtype=e.dtype)
        self._copy_at(name, mapping, e.offset + start * e.dtype.itemsize, data)

    def _copy_at(self, name: str, mapping: Mapping, lo: int, data: np.ndarray) -> None:
        """Copy `data` to byte `lo` of the mapping (non-temporal stores on pmem) and note the range
        for the next persist."""
        mapping.copy(lo, data)
        old = self._dirty.get(name)
        self._dirty[name] = (
            (lo, lo + data.nbytes)
            if old is None
            else (min(old[0], lo), max(old[1], lo + data.nbytes))
        )

    def readable(self, name: str) -> np.ndarray:
        """A read-only view: reading does not make persist() flush the whole array."""
        mapping, e = self._entry(name)
        return mapping.view(e.offset, e.shape, e.dtype, writeable=False)

    def order(self, name: str) -> None:
        """pmem_drain on persistent memory: the copies made so far are durable before any later
        one."""
        mapping, _ = self._entry(name)
        if mapping.is_pmem:
            lib().pmem_drain()

    def persist(self, name: str) -> None:
        if self.readonly:
            return
        mapping, e = self._entry(name)
        if name in self._exposed:
            mapping.persist(e.offset, e.nbytes)  # the caller may still write through its view
            self._dirty.pop(name, None)
        elif name in self._dirty:
            lo, hi = self._dirty.pop(name)
            mapping.persist(lo, hi - lo, copied_only=True)

    def free_bytes(self) -> int | None:
        return self._layout.free_bytes()

    def describe(self) -> str:
        return self._layout.describe()

    def _lock_path(self, name: str) -> Path:
        return self._layout.lock_path(name)

    def close(self) -> None:
        for name in list(self._open):
            self.persist(name)
        self._open.clear()
        self._layout.close()
        super().close()
