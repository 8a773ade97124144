"""Helpers shared by tiers that keep each array in a file of a directory."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from nvmlib.backends.base import ALIGN, aligned_empty, open_plain
from nvmlib.errors import StoreError


def prepare_dir(path: Path, readonly: bool) -> Path:
    """Check (and, for writers, create) a store directory, with an error that says what to do."""
    path = Path(path).expanduser()
    if readonly:
        if not path.is_dir():
            raise StoreError(f"{path} is not a directory holding a posterior; check the path")
        return path
    blocked = not_a_directory(path)
    if blocked is not None:
        raise StoreError(
            f"cannot create the store directory {path}: {blocked} is a file, not a directory; "
            "choose another path"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the store directory {path}: {exc.strerror}; "
            "choose a path you can write (e.g. --posterior_path under your home)"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(
            f"the store directory {path} is not writable; fix its permissions "
            "or choose another path"
        )
    return path


def not_a_directory(path: Path) -> Path | None:
    """The first of `path` and its parents that exists and is not a directory (so no directory can
    be made there), or None."""
    return next((d for d in (path, *path.parents) if d.exists() and not d.is_dir()), None)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def reserve(fd: int, offset: int, length: int, path: Path) -> None:
    """Allocate the blocks of a file up front so that a full disk fails now, not mid-run."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"no space left on the device of {path} for {length / 1e6:.3f} MB; "
                "free space or choose another path"
            ) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
            raise


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def punch(fd: int, offset: int, length: int, path: Path) -> None:
    """Free the blocks of [offset, offset + length) of a file (they read as zeros, the size stays);
    nothing where the file system cannot (the blocks are then reused when written again)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if length > 0 and libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            raise StoreError(
                f"cannot free bytes {offset}..{offset + length} of {path}: {os.strerror(err)}"
            )


def occupied_bytes(*files: Path) -> int:
    """Bytes the blocks of `files` take (st_blocks, each inode once: what `du` counts); a missing
    file takes none."""
    seen, total = set(), 0
    for file in files:
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def os_error(exc: OSError, path: Path | str, doing: str, nbytes: int | None = None) -> StoreError:
    """Translate an OSError of a tier's write into a StoreError that names the file, the bytes it
    needed and a fix."""
    need = f" ({nbytes:,} bytes to write)" if nbytes is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"the disk of {path} filled up while {doing}{need}; the posterior up to the last "
            "completed update is intact: free space and resume"
        )
    if exc.errno == errno.EFBIG:
        return StoreError(
            f"{doing} {path}{need} would exceed this process's file size limit (ulimit -f); "
            "raise the limit and resume"
        )
    return StoreError(f"{doing} {path}{need} failed: {exc.strerror or exc}")


def write_all(fd: int, buf: memoryview, offset: int) -> None:
    """pwrite all of `buf` at `offset` (one pwrite may write less than asked)."""
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


def read_all(fd: int, buf: memoryview, offset: int, file: Path) -> None:
    """Fill `buf` from `offset` of `file`; StoreError if the file ends first."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise StoreError(f"{file} is shorter than its header says; the file is damaged")
        done += got


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (a file created, renamed or removed there)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: memoryview | bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one: a new
    temporary file beside it (never through a link), fsync, rename, fsync of the directory. A full
    disk or a file size limit is a StoreError that names it; the old file is kept."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        try:
            write_all(fd, memoryview(data).cast("B"), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            why = (
                "the file would exceed ulimit -f"
                if exc.errno == errno.EFBIG
                else "the disk is full"
            )
            raise StoreError(
                f"cannot write {path}: {why} ({exc.strerror}); the previous {path.name} is intact: "
                "free space (or raise the limit) and resume"
            ) from exc
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc


def npy_header(file: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of .npy `file`, checked against its size: StoreError when the
    header is unreadable or the file is shorter than it says (never grown back with zeros)."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise StoreError(f"{file} does not exist") from None
    except (ValueError, OSError) as exc:
        raise StoreError(
            f"{file} is not an array file nvmlib wrote ({exc}); the store is damaged"
        ) from exc
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < need:
        raise StoreError(
            f"{file} has {size} bytes but its header says {need}: the file was truncated and the "
            "store is damaged (restore the file from a copy)"
        )
    return offset, tuple(shape), np.dtype(dtype)


def create_npy(
    file: Path, shape: tuple[int, ...], dtype: np.dtype, preallocate: bool = True
) -> None:
    """A new zero-filled .npy file whose data starts at byte ALIGN (np.load reads it as usual),
    durable with its directory entry when this returns."""
    header = repr(
        {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": tuple(shape),
        }
    )
    header = (
        header.ljust(ALIGN - 11) + "\n"
    )  # magic (6) + version (2) + length (2) + header = ALIGN
    end = ALIGN + int(np.prod(shape)) * dtype.itemsize
    try:
        with open(file, "xb") as f:
            f.write(
                np.lib.format.magic(1, 0) + struct.pack("<H", len(header)) + header.encode("latin1")
            )
            f.truncate(end)
            if preallocate:
                reserve(f.fileno(), 0, end, file)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(file.parent)
    except FileExistsError:
        raise StoreError(f"{file} already exists; delete it or choose another directory") from None
    except OSError as exc:
        file.unlink(missing_ok=True)
        raise os_error(exc, file, "creating") from exc
    except StoreError:
        file.unlink(missing_ok=True)
        raise


class DirectIO:
    """pwrite/pread of one file with O_DIRECT, bypassing the page cache: no copy into it, no
    write-back work, no cache to fill. Offsets and lengths must be multiples of ALIGN (`fits`);
    buffers that do not start on a page are staged through an aligned one."""

    MIN_BYTES = 1 << 16  # smaller writes (counters, commit records) stay buffered

    def __init__(self, fd: int, file: Path) -> None:
        self.fd, self.file = fd, file
        self._staging = aligned_empty((0,), np.uint8)

    @classmethod
    def open(cls, file: Path, readonly: bool, one_name: bool = True) -> "DirectIO | None":
        """A DirectIO for `file`, or None where its file system has no O_DIRECT (e.g. older tmpfs);
        one_name as in open_plain."""
        try:
            return cls(
                open_plain(file, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT, one_name),
                file,
            )
        except StoreError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EINVAL:
                return None  # the file system refused O_DIRECT
            raise

    @staticmethod
    def fits(offset: int, nbytes: int) -> bool:
        """Whether [offset, offset + nbytes) is whole blocks, and large enough to be worth
        O_DIRECT."""
        return offset % ALIGN == 0 and nbytes % ALIGN == 0 and nbytes >= DirectIO.MIN_BYTES

    def _stage(self, nbytes: int) -> np.ndarray:
        if len(self._staging) < nbytes:
            self._staging = aligned_empty((nbytes,), np.uint8)
        return self._staging[:nbytes]

    def write(self, data: np.ndarray, offset: int) -> None:
        """Write contiguous `data` at `offset` (durable after fdatasync, like any write)."""
        buf = memoryview(data).cast("B")
        if data.ctypes.data % ALIGN:
            staged = self._stage(len(buf))
            staged[:] = np.frombuffer(buf, np.uint8)
            buf = memoryview(staged)
        write_all(self.fd, buf, offset)

    def read(self, out: np.ndarray, offset: int) -> None:
        """Fill contiguous `out` from `offset`."""
        target = out if out.ctypes.data % ALIGN == 0 else self._stage(out.nbytes)
        read_all(self.fd, memoryview(target).cast("B"), offset, self.file)
        if target is not out:
            memoryview(out).cast("B")[:] = memoryview(target).cast("B")

    def close(self) -> None:
        os.close(self.fd)
