"""PMDK's libpmem through ctypes: map a file or device, copy into it, make it durable.

PMDK decides once per process whether a mapping is persistent memory; the environment
variable PMEM_IS_PMEM_FORCE=1 (read by libpmem when it is loaded) makes it answer yes on
any file system, which is PMDK's own way to exercise the cache-flush path without hardware.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import stat
from functools import cache
from pathlib import Path

import numpy as np

from nvmlib.backends.files import DirectIO, write_all
from nvmlib.backends.registry import TIERS
from nvmlib.errors import StoreError, TierUnavailable

FILE_CREATE, FILE_EXCL, FILE_SPARSE, FILE_TMPFILE = 1, 2, 4, 8
MADV_POPULATE_WRITE = 23

_c = ctypes
_SIGNATURES = {
    "pmem_map_file": (
        _c.c_void_p,
        [
            _c.c_char_p,
            _c.c_size_t,
            _c.c_int,
            _c.c_uint,
            _c.POINTER(_c.c_size_t),
            _c.POINTER(_c.c_int),
        ],
    ),
    "pmem_unmap": (_c.c_int, [_c.c_void_p, _c.c_size_t]),
    "pmem_is_pmem": (_c.c_int, [_c.c_void_p, _c.c_size_t]),
    "pmem_persist": (None, [_c.c_void_p, _c.c_size_t]),
    "pmem_msync": (_c.c_int, [_c.c_void_p, _c.c_size_t]),
    "pmem_memcpy_persist": (_c.c_void_p, [_c.c_void_p, _c.c_void_p, _c.c_size_t]),
    "pmem_memcpy_nodrain": (_c.c_void_p, [_c.c_void_p, _c.c_void_p, _c.c_size_t]),
    "pmem_memset_persist": (_c.c_void_p, [_c.c_void_p, _c.c_int, _c.c_size_t]),
    "pmem_drain": (None, []),
    "pmem_errormsg": (_c.c_char_p, []),
}


@cache
def lib() -> ctypes.CDLL:
    """The loaded libpmem, or TierUnavailable with the install hint."""
    name = ctypes.util.find_library("pmem") or "libpmem.so.1"
    try:
        dll = ctypes.CDLL(name, use_errno=True)
        for fn, (restype, argtypes) in _SIGNATURES.items():
            getattr(dll, fn).restype, getattr(dll, fn).argtypes = restype, argtypes
    except (OSError, AttributeError) as exc:
        raise TierUnavailable(
            f"the pmem tier needs PMDK's libpmem, which cannot be loaded ({exc}): "
            f"{TIERS['pmem'][1]}"
        ) from exc
    return dll


def _error(doing: str, path: Path) -> StoreError:
    msg = (lib().pmem_errormsg() or b"").decode(errors="replace")
    return StoreError(f"libpmem could not {doing} {path}: {msg or os.strerror(ctypes.get_errno())}")


class Mapping:
    """One pmem_map_file mapping of a whole file or device.

    Writes go through `copy` (non-temporal copy + flush when the mapping is persistent memory,
    pwrite into the same page cache otherwise) and become durable with `persist` (pmem_drain, or
    pmem_msync of the range when the mapping is not persistent memory). Every view keeps its mapping
    alive, so the memory is unmapped only when the last view is gone (like np.memmap).
    """

    def __init__(
        self, path: Path, length: int = 0, tmpfile: bool = False, readonly: bool = False
    ) -> None:
        """Map all of file or device `path`; tmpfile: map a new unnamed file of `length` in
        directory `path`; readonly: map it for reading only (libpmem maps read-write, which a
        read-only mount refuses)."""
        self.fd = self.direct = None
        if readonly:
            return self._map_readonly(path)
        mapped, is_pmem = ctypes.c_size_t(0), ctypes.c_int(0)
        flags = FILE_CREATE | FILE_TMPFILE if tmpfile else 0
        addr = lib().pmem_map_file(
            os.fsencode(path), length, flags, 0o600, ctypes.byref(mapped), ctypes.byref(is_pmem)
        )
        if not addr:
            raise _error("map", path)
        self.path, self.addr, self.length, self.is_pmem = (
            path,
            addr,
            mapped.value,
            bool(is_pmem.value),
        )
        self.readonly = False
        # Off persistent memory the mapping is page cache: pwrite fills it without a page fault per
        # page, and whole 4 KiB blocks (the log's rows) go to the device with O_DIRECT, past the
        # cache.
        self.fd = None if self.is_pmem or tmpfile else os.open(path, os.O_RDWR)
        self.direct = (
            None
            if self.fd is None or stat.S_ISCHR(os.fstat(self.fd).st_mode)
            else DirectIO.open(path, readonly=False)
        )

    def _map_readonly(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            length = (
                st.st_size
                if not stat.S_ISCHR(st.st_mode)
                else int(
                    Path(
                        f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/size"
                    ).read_text()
                )
            )
            addr = (
                _libc().mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if length
                else None
            )
        except OSError as exc:
            raise StoreError(f"cannot map {path} for reading: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise StoreError(
                f"cannot map {path} for reading: "
                f"{os.strerror(ctypes.get_errno()) if length else 'it is empty'}"
            )
        self.path, self.addr, self.length, self.is_pmem, self.readonly = (
            path,
            addr,
            length,
            False,
            True,
        )

    def view(
        self, offset: int, shape: tuple[int, ...], dtype: np.dtype, writeable: bool
    ) -> np.ndarray:
        """A numpy array over [offset, offset + its size) of the mapping."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise StoreError(
                f"{self.path} is shorter than its table says ({self.length} bytes < "
                f"{offset + nbytes}); the file or device is damaged or was resized"
            )
        raw = (ctypes.c_char * nbytes).from_address(self.addr + offset)
        raw.mapping = self
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
        arr.flags.writeable = writeable
        return arr

    def copy(self, offset: int, data: np.ndarray) -> None:
        """Copy contiguous `data` to `offset`; durable after the next `persist`."""
        if self.is_pmem:
            lib().pmem_memcpy_nodrain(self.addr + offset, data.ctypes.data, data.nbytes)
        elif self.direct is not None and DirectIO.fits(offset, data.nbytes):
            self.direct.write(data, offset)
        else:
            write_all(self.fd, memoryview(data).cast("B"), offset)

    def populate(self, offset: int, length: int) -> None:
        """Fault [offset, offset+length) in for writing now (madvise MADV_POPULATE_WRITE, Linux >=
        5.14), so that appends do not take a page fault per page; where the kernel lacks it, nothing
        happens."""
        start = offset - offset % mmap.PAGESIZE
        ctypes.CDLL(None).madvise(
            ctypes.c_void_p(self.addr + start),
            ctypes.c_size_t(offset + length - start),
            MADV_POPULATE_WRITE,
        )

    def zero(self, offset: int, length: int) -> None:
        """Fill [offset, offset+length) with zeros and make that durable."""
        if self.is_pmem:
            lib().pmem_memset_persist(self.addr + offset, 0, length)
        else:
            ctypes.memset(self.addr + offset, 0, length)
            self.persist(offset, length)

    def persist(self, offset: int, length: int, copied_only: bool = False) -> None:
        """Make [offset, offset+length) durable; copied_only: only `copy` wrote there since."""
        if self.is_pmem:
            if copied_only:
                lib().pmem_drain()
            else:
                lib().pmem_persist(self.addr + offset, length)
        elif length and lib().pmem_msync(self.addr + offset, length) != 0:
            raise _error("flush", self.path)

    def __del__(self) -> None:
        if not hasattr(self, "addr"):  # the mapping failed
            return
        if self.readonly:
            _libc().munmap(self.addr, self.length)
        else:
            lib().pmem_unmap(self.addr, self.length)
        if self.fd is not None:
            os.close(self.fd)
        if self.direct is not None:
            self.direct.close()


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long],
    )
    libc.munmap.restype, libc.munmap.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def is_pmem_dir(path: Path) -> bool:
    """Whether libpmem sees the file system of directory `path` as persistent memory."""
    return Mapping(path, 4096, tmpfile=True).is_pmem
