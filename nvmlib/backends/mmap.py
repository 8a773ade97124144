"""mmap tier: one .npy file per array in a directory (NVMe, SSD, any file system).

Rows are appended with pwrite (no read-modify-write of evicted pages), durability is
fdatasync, and with cache="bounded" (the default) every written or read range is handed
back to the kernel with posix_fadvise(DONTNEED): that starts write-back at once and keeps
the page cache from filling when the log is larger than RAM.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nvmlib.backends.base import Store, check_fits
from nvmlib.backends.files import disk_free, os_error, prepare_dir, reserve
from nvmlib.errors import StoreError

SUFFIX = ".npy"
DROP_MIN = 1 << 16  # ranges smaller than this (counters, commit records) stay cached


class MmapStore(Store):
    """Arrays as .npy files, readable by plain `np.load(..., mmap_mode="r")`."""

    kind = "mmap"

    def __init__(self, path: str | Path | None = None, readonly: bool = False,
                 cache: str = "bounded", preallocate: bool = True) -> None:
        if path is None:
            raise StoreError("the mmap tier needs a directory: open_store('mmap', '/mnt/nvme0/posterior')")
        if cache not in ("bounded", "keep"):
            raise StoreError(f"cache must be 'bounded' or 'keep', not {cache!r}")
        super().__init__(prepare_dir(Path(path), readonly), readonly)
        self.cache = cache
        self.preallocate = preallocate
        self._maps: dict[str, np.memmap] = {}
        self._fds: dict[str, int] = {}
        self._last_write: dict[str, tuple[int, int]] = {}

    def _file(self, name: str) -> Path:
        return self.path / f"{name}{SUFFIX}"

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self._check_writable()
        file = self._file(name)
        if file.exists():
            raise StoreError(f"{file} already exists; delete it or choose another directory")
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        check_fits(self, nbytes, f"array {name!r}")
        try:
            arr = np.lib.format.open_memmap(file, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        except OSError as exc:
            file.unlink(missing_ok=True)
            raise os_error(exc, file, "creating") from exc
        if self.preallocate and nbytes:
            try:
                reserve(self._fd(name), arr.offset, nbytes, file)
            except StoreError:
                self.delete(name)
                raise
        self._maps[name] = arr

    def array(self, name: str) -> np.ndarray:
        if name not in self._maps:
            file = self._file(name)
            if not file.exists():
                raise StoreError(f"{self.path} holds no array {name!r}")
            self._maps[name] = np.load(file, mmap_mode="r" if self.readonly else "r+")
        return self._maps[name]

    def names(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.path.glob(f"*{SUFFIX}"))

    def delete(self, name: str) -> None:
        self._maps.pop(name, None)
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        self._file(name).unlink(missing_ok=True)

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            flags = os.O_RDONLY if self.readonly else os.O_RDWR
            self._fds[name] = os.open(self._file(name), flags)
        return self._fds[name]

    def _offset(self, name: str, row: int) -> int:
        arr = self.array(name)
        return arr.offset + row * (arr.strides[0] if arr.ndim else arr.itemsize)

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        self._check_writable()
        arr = self.array(name)
        data = np.ascontiguousarray(rows, dtype=arr.dtype)
        if start < 0 or start + len(data) > arr.shape[0]:
            raise StoreError(f"rows {start}..{start + len(data)} are outside {name!r} of {arr.shape[0]} rows")
        off, view = self._offset(name, start), memoryview(data).cast("B")
        fd = self._fd(name)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], off + done)
        except OSError as exc:
            raise os_error(exc, self._file(name), "writing") from exc
        if self.cache == "bounded" and len(view) >= DROP_MIN:
            prev = self._last_write.get(name)
            if prev is not None:
                os.posix_fadvise(fd, prev[0], prev[1], os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, off, len(view), os.POSIX_FADV_DONTNEED)
            self._last_write[name] = (off, len(view))

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        arr = self.array(name)
        if out is None:
            out = np.empty((stop - start,) + arr.shape[1:], dtype=arr.dtype)
        view = memoryview(out).cast("B")
        off, fd, done = self._offset(name, start), self._fd(name), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], off + done)
            if got == 0:
                raise StoreError(f"{self._file(name)} is shorter than its header says; the file is damaged")
            done += got
        if self.cache == "bounded" and len(view) >= DROP_MIN:
            os.posix_fadvise(fd, off, len(view), os.POSIX_FADV_DONTNEED)
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
        self._maps.clear()
        self._last_write.clear()
        super().close()
