"""DRAM tier: numpy arrays in RAM (also the paper's "DRAM + Optane memory mode" setting)."""

from __future__ import annotations

import ctypes
import mmap
import threading
from functools import cache
from pathlib import Path

import numpy as np

from nvmlib.backends.base import Store, aligned_empty, check_fits
from nvmlib.errors import LockedError, StoreError


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def _pages(arr: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """(address, length) of the whole pages inside rows start..stop−1 of `arr` (which starts
    on a page)."""
    row = arr.strides[0] if arr.ndim else arr.itemsize
    lo, hi = start * row, min(stop * row, arr.nbytes)
    lo += -lo % mmap.PAGESIZE
    hi -= hi % mmap.PAGESIZE if hi < arr.nbytes else 0
    return arr.ctypes.data + lo, max(0, hi - lo)


class DramStore(Store):
    """Arrays live in this process's memory; nothing survives the process. A sparse array is memory
    the kernel gives page by page as rows are written (`release`: MADV_REMOVE hands pages back)."""

    kind = "dram"
    persistent = False
    grows = True
    in_place = True

    def __init__(self, path: str | Path | None = None, readonly: bool = False) -> None:
        super().__init__(None, readonly)
        self._arrays: dict[str, np.ndarray] = {}
        self._locked: set[str] = set()
        self._mutex = threading.Lock()

    def create(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        self._check_writable()
        if name in self._arrays:
            raise StoreError(f"array {name!r} already exists in the dram tier")
        if sparse:  # zero pages until written; no huge pages (they come and go 2 MB at a time)
            self._arrays[name] = aligned_empty(tuple(shape), dtype)
            return
        check_fits(self, int(np.prod(shape)) * np.dtype(dtype).itemsize, f"array {name!r}")
        arr = aligned_empty(tuple(shape), dtype, huge=True)
        arr.fill(
            0
        )  # touch every page now, not on the first update (np.zeros maps lazily): on a VM a
        # first touch costs milliseconds per MB, which would otherwise land in the epochs
        self._arrays[name] = arr

    def allocate(self, name: str, start: int, stop: int) -> None:
        arr = self.array(name)
        need = (stop - start) * (arr.strides[0] if arr.ndim else arr.itemsize)
        free = _mem_available()
        if free is not None and need > free:
            raise StoreError(
                f"the dram tier has {free / 1e6:.3f} MB of memory available, not the "
                f"{need / 1e6:.3f} MB rows {start}..{stop - 1} of {name!r} need; free "
                "space in memory (close other programs) or choose a file tier"
            )

    def release(self, name: str, start: int, stop: int) -> None:
        addr, length = _pages(self.array(name), start, stop)
        if length:
            _libc().madvise(addr, length, mmap.MADV_REMOVE)  # shared anonymous memory: the pages go

    def occupied(self, name: str) -> int:
        arr = self.array(name)
        pages = -(-arr.nbytes // mmap.PAGESIZE)
        vec = np.zeros(max(pages, 1), np.uint8)
        if arr.nbytes and _libc().mincore(arr.ctypes.data, arr.nbytes, vec.ctypes.data) != 0:
            return arr.nbytes
        return int(np.count_nonzero(vec & 1)) * mmap.PAGESIZE

    def array(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name]
        except KeyError:
            raise StoreError(f"the dram tier holds no array {name!r}") from None

    def names(self) -> list[str]:
        return list(self._arrays)

    def delete(self, name: str) -> None:
        self._arrays.pop(name, None)

    def free_bytes(self) -> int | None:
        return _mem_available()

    def lock(self, name: str) -> None:
        with self._mutex:
            if name in self._locked:
                raise LockedError(
                    f"{name} in this dram store already has a writer; close it first "
                    "or open the posterior read-only (readonly=True)"
                )
            self._locked.add(name)

    def unlock(self, name: str) -> None:
        self._locked.discard(name)

    def close(self) -> None:
        self._locked.clear()
