"""mmap tier: one .npy file per array in a directory (NVMe, SSD, any file system).

Each file's data starts at byte 4096 and the posterior log's rows are padded to 4 KiB
(ALIGN), so rows are written and read with O_DIRECT: the device's own speed, almost no
CPU, and no page cache to fill when the log is larger than RAM. Other writes (counters,
moments, or a file system without O_DIRECT) use pwrite; with cache="bounded" (the default)
their large ranges are handed back with posix_fadvise(DONTNEED). Durability is fdatasync.
A sparse array (a compressed log) is a file with holes: `allocate` gives rows their blocks with
posix_fallocate before they are written (a full disk refuses there, not in the middle of a write),
`release` punches them out again (fallocate PUNCH_HOLE).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nvmlib.backends.base import Store, aligned_empty, check_fits, flat_index, open_plain
from nvmlib.backends.files import (
    DirectIO,
    create_npy,
    disk_free,
    fsync_dir,
    npy_header,
    occupied_bytes,
    os_error,
    prepare_dir,
    punch,
    read_all,
    reserve,
    write_all,
)
from nvmlib.errors import StoreError

SUFFIX = ".npy"
DROP_MIN = 1 << 16  # ranges smaller than this (counters, commit records) stay cached


class MmapStore(Store):
    """Arrays as .npy files, readable by plain `np.load(..., mmap_mode="r")`."""

    kind = "mmap"
    grows = True

    def __init__(
        self,
        path: str | Path | None = None,
        readonly: bool = False,
        cache: str = "bounded",
        preallocate: bool = True,
    ) -> None:
        if path is None:
            raise StoreError(
                "the mmap tier needs a directory: open_store('mmap', '/mnt/nvme0/posterior')"
            )
        if cache not in ("bounded", "keep"):
            raise StoreError(f"cache must be 'bounded' or 'keep', not {cache!r}")
        super().__init__(prepare_dir(Path(path), readonly), readonly)
        self.cache = cache
        self.preallocate = preallocate
        self._maps: dict[str, np.memmap] = {}
        self._fds: dict[str, int] = {}
        self._direct: dict[str, DirectIO | None] = {}
        self._last_write: dict[str, tuple[int, int]] = {}

    def _file(self, name: str) -> Path:
        return self.path / f"{name}{SUFFIX}"

    def create(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        self._check_writable()
        if not sparse:
            check_fits(self, int(np.prod(shape)) * np.dtype(dtype).itemsize, f"array {name!r}")
        create_npy(self._file(name), tuple(shape), np.dtype(dtype), self.preallocate and not sparse)

    def array(self, name: str) -> np.ndarray:
        if name not in self._maps:
            file = self._file(name)
            if not file.exists():
                raise StoreError(f"{self.path} holds no array {name!r}")
            fd = self._fd(
                name
            )  # a link or shared file is refused before anything is read through it
            offset, shape, dtype = npy_header(file)
            with open(fd, "rb" if self.readonly else "r+b", closefd=False) as f:
                self._maps[name] = np.memmap(
                    f, dtype, "r" if self.readonly else "r+", offset, shape
                )
        return self._maps[name]

    def names(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.path.glob(f"*{SUFFIX}"))

    def __contains__(self, name: str) -> bool:
        return self._file(name).is_file()

    def delete(self, name: str) -> None:
        self._maps.pop(name, None)
        fd, direct = self._fds.pop(name, None), self._direct.pop(name, None)
        if fd is not None:
            os.close(fd)
        if direct is not None:
            direct.close()
        self._file(name).unlink(missing_ok=True)
        fsync_dir(self.path)

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            flags = os.O_RDONLY if self.readonly else os.O_RDWR
            self._fds[name] = open_plain(self._file(name), flags)
        return self._fds[name]

    def _direct_io(self, name: str, offset: int, nbytes: int) -> DirectIO | None:
        """The file's O_DIRECT handle when this range can use it (`DirectIO.fits`), else None."""
        if not DirectIO.fits(offset, nbytes):
            return None
        if name not in self._direct:
            self._direct[name] = DirectIO.open(self._file(name), self.readonly)
        return self._direct[name]

    def _offset(self, name: str, row: int) -> int:
        arr = self.array(name)
        return arr.offset + row * (arr.strides[0] if arr.ndim else arr.itemsize)

    def _span(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """(file offset, bytes) of rows start..stop−1 of `name`."""
        arr = self.array(name)
        row = arr.strides[0] if arr.ndim else arr.itemsize
        return self._offset(name, start), (stop - start) * row

    def allocate(self, name: str, start: int, stop: int) -> None:
        self._check_writable()
        reserve(self._fd(name), *self._span(name, start, stop), self._file(name))

    def release(self, name: str, start: int, stop: int) -> None:
        self._check_writable()
        punch(self._fd(name), *self._span(name, start, stop), self._file(name))

    def occupied(self, name: str) -> int:
        return occupied_bytes(self._file(name))

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        self._check_writable()
        arr = self.array(name)
        data = np.ascontiguousarray(rows, dtype=arr.dtype)
        if start < 0 or start + len(data) > arr.shape[0]:
            raise StoreError(
                f"rows {start}..{start + len(data)} are outside {name!r} of {arr.shape[0]} rows"
            )
        self._write_at(name, self._offset(name, start), data)

    def write_flat(self, name: str, start: int, values: np.ndarray) -> None:
        self._check_writable()
        arr = self.array(name)
        flat_index(arr.shape, start, len(values))
        data = np.ascontiguousarray(values, dtype=arr.dtype)
        self._write_at(name, arr.offset + start * arr.dtype.itemsize, data, cached=True)

    def _write_at(self, name: str, off: int, data: np.ndarray, cached: bool = False) -> None:
        """Write `data` at byte `off` of the file: O_DIRECT where it fits, else pwrite (and, with
        cache="bounded", large ranges handed back to the kernel once written). `cached`: through
        the page cache, left there (flat ranges: blocks of moments that are read again soon; the
        kernel keeps them while memory allows, outside this process's resident set)."""
        view = memoryview(data).cast("B")
        direct = None if cached else self._direct_io(name, off, len(view))
        fd = self._fd(name)
        try:
            if direct is not None:
                return direct.write(data, off)
            write_all(fd, view, off)
        except OSError as exc:
            raise os_error(exc, self._file(name), "writing") from exc
        if self.cache == "bounded" and len(view) >= DROP_MIN and not cached:
            prev = self._last_write.get(name)
            if prev is not None:
                os.posix_fadvise(fd, prev[0], prev[1], os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, off, len(view), os.POSIX_FADV_DONTNEED)
            self._last_write[name] = (off, len(view))

    def read_rows(
        self, name: str, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        arr = self.array(name)
        if out is None:
            out = aligned_empty((stop - start,) + arr.shape[1:], arr.dtype)
        return self._read_at(name, self._offset(name, start), out)

    def read_flat(
        self, name: str, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        arr = self.array(name)
        flat_index(arr.shape, start, stop - start)
        if out is None:
            out = aligned_empty((stop - start,), arr.dtype)
        return self._read_at(name, arr.offset + start * arr.dtype.itemsize, out, cached=True)

    def _read_at(self, name: str, off: int, out: np.ndarray, cached: bool = False) -> np.ndarray:
        """Fill `out` from byte `off` of the file (O_DIRECT where it fits; `cached`: as
        _write_at)."""
        view = memoryview(out).cast("B")
        fd = self._fd(name)
        direct = None if cached else self._direct_io(name, off, len(view))
        if direct is not None:
            direct.read(out, off)
            return out
        read_all(fd, view, off, self._file(name))
        if self.cache == "bounded" and len(view) >= DROP_MIN and not cached:
            os.posix_fadvise(fd, off, len(view), os.POSIX_FADV_DONTNEED)
        return out

    def read_cols(
        self, name: str, start: int, stop: int, col0: int, col1: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Each row's columns col0..col1−1 read at their offset (O_DIRECT where they are whole
        blocks): a block of parameters of every kept row reads only that block."""
        arr = self.array(name)
        if out is None:
            out = aligned_empty((stop - start, col1 - col0), arr.dtype)
        fd, nbytes = self._fd(name), (col1 - col0) * arr.dtype.itemsize
        for i in range(stop - start):
            off = self._offset(name, start + i) + col0 * arr.dtype.itemsize
            direct = self._direct_io(name, off, nbytes)
            if direct is not None:
                direct.read(out[i], off)
                continue
            read_all(fd, memoryview(out[i]).cast("B"), off, self._file(name))
            if self.cache == "bounded" and nbytes >= DROP_MIN:
                os.posix_fadvise(fd, off, nbytes, os.POSIX_FADV_DONTNEED)
        return out

    def persist(self, name: str) -> None:
        if self.readonly:
            return
        try:
            if name in self._maps:
                self._maps[name].flush()
            os.fdatasync(self._fd(name))
        except OSError as exc:
            raise os_error(exc, self._file(name), "flushing") from exc

    def free_bytes(self) -> int | None:
        return disk_free(self.path)

    def close(self) -> None:
        for name in list(self._fds):
            if not self.readonly:
                self.persist(name)
            os.close(self._fds.pop(name))
        for direct in self._direct.values():
            if direct is not None:
                direct.close()
        self._direct.clear()
        self._maps.clear()
        self._last_write.clear()
        super().close()
