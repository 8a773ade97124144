"""The Store protocol every memory tier implements, plus the writer lock they share."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from nvmlib.errors import LockedError, StoreError


class Store(ABC):
    """Named, typed, fixed-shape arrays on one memory tier.

    Arrays are written with `write_rows` (the hot path: one contiguous row per call), read
    with `read_rows` (streamed chunks), and made durable with `persist`. `array` gives a
    numpy view for in-place use where the tier allows it.
    """

    kind: ClassVar[str]
    persistent: ClassVar[bool] = True
    # other machines can open it by its URL (a dask worker reads the log there)
    shared: ClassVar[bool] = False
    # create(sparse=True) takes no space up front: allocate() gives it as rows are written,
    # release() hands it back; where False, every array takes its whole size at create
    grows: bool = False
    # array() is the data itself, in this process's memory, with nothing to persist: a log's
    # rows may be staged straight into it (no copy from a staged ring)
    in_place: ClassVar[bool] = False

    def __init__(self, path: str | Path | None = None, readonly: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.readonly = readonly
        self._lock_fds: dict[str, int] = {}

    @classmethod
    def check_available(cls) -> None:
        """Raise TierUnavailable when this tier cannot run on this machine."""

    # ---- arrays -------------------------------------------------------------------------
    @abstractmethod
    def create(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        """Make a new zero-filled array; StoreError if it exists or does not fit. sparse: where
        the tier `grows`, take no space yet (rows take it with `allocate`; the caller checks the
        room)."""

    def create_log(
        self, name: str, shape: tuple[int, int], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        """A new array whose rows are written in order, as a log's are (a tier may lay it out
        for that: zarr in shards); create() where the tier has no such layout."""
        self.create(name, shape, dtype, sparse)

    @abstractmethod
    def array(self, name: str) -> np.ndarray:
        """The array itself (a view into the tier where possible)."""

    @abstractmethod
    def names(self) -> list[str]:
        """Names of the arrays this store holds."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove an array and free its space."""

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return self.array(name).dtype

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        """Write `rows` into array[start:start+len(rows)] (rows has the array's dtype)."""
        self._check_writable()
        self.array(name)[start : start + len(rows)] = rows

    def readable(self, name: str) -> np.ndarray:
        """The array to read from (a tier that tracks what array() hands out for writing gives a
        read-only view here)."""
        return self.array(name)

    def read_rows(
        self, name: str, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Copy array[start:stop] into `out` (allocated when None) and return it."""
        src = self.readable(name)[start:stop]
        if out is None:
            return np.array(src)
        out[...] = src
        return out

    def read_cols(
        self, name: str, start: int, stop: int, col0: int, col1: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Copy array[start:stop, col0:col1] into `out` (allocated when None) and return it: a
        block of columns of some rows, what a pass over parameter blocks reads."""
        src = self.readable(name)[start:stop, col0:col1]
        if out is None:
            return np.array(src)
        out[...] = src
        return out

    def write_flat(self, name: str, start: int, values: np.ndarray) -> None:
        """Write the 1-D `values` into elements start.. of the array read in C order, a range
        within one row of its last axis (a block of parameters of one sum of a moments slot)."""
        self._check_writable()
        self.array(name)[flat_index(self.shape(name), start, len(values))] = values

    def read_flat(
        self, name: str, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Copy elements start..stop−1 of the array read in C order (within one row of its last
        axis, as write_flat) into `out` (allocated when None) and return it."""
        src = self.readable(name)[flat_index(self.shape(name), start, stop - start)]
        if out is None:
            return np.array(src)
        out[...] = src
        return out

    def persist(self, name: str) -> None:
        """Make every write to `name` durable on this tier (no-op where nothing persists)."""

    def publish(self, name: str) -> None:
        """Lay `name` out as the tier's own library writes it, for readers that know only that
        library (plain zarr), when its writer stops; a no-op where every write already is."""

    def order(self, name: str) -> None:
        """Make earlier writes to `name` reach the media before any later write (a store fence);
        where that costs a flush (files), a no-op: checksums then catch a later write that overtook
        it."""

    def shard_rows(self, name: str) -> int:
        """Rows of array `name` that are stored together (a zarr shard): a reader elsewhere reads
        whole groups of them; 1 where every row stands alone."""
        return 1

    def reopen_args(self) -> tuple[str, str, dict]:
        """(tier, path or URL, options): what open_store needs to open this store read-only in
        another process; on another machine too where `shared` says so."""
        return self.kind, str(self.path), {}

    def nbytes(self, name: str | None = None) -> int:
        """Bytes one array (or, with None, all arrays) occupy on the tier."""
        names = [name] if name is not None else self.names()
        return sum(int(np.prod(self.shape(n))) * self.dtype(n).itemsize for n in names)

    def free_bytes(self) -> int | None:
        """Bytes still available on the tier, or None when unknown."""
        return None

    # ---- growth (tiers that `grow`) -------------------------------------------------------
    def allocate(self, name: str, start: int, stop: int) -> None:
        """Give rows start..stop−1 of a sparse array their space before they are written:
        StoreError naming the tier and asking to free space when it has none (nothing is written
        then). A no-op where every array took its whole size at create."""

    def release(self, name: str, start: int, stop: int) -> None:
        """Hand the space of rows start..stop−1 back to the tier (they read as zeros, or as
        before where the tier cannot hand space back); the next write there allocates it again."""

    def occupied(self, name: str) -> int:
        """Bytes array `name` takes on the tier now: its blocks (what `du` counts) where the tier
        can tell, else its size."""
        return self.nbytes(name)

    def describe(self) -> str:
        return f"{self.kind} tier" + (f" at {self.path}" if self.path else "")

    # ---- single writer ------------------------------------------------------------------
    def lock(self, name: str) -> None:
        """Become the only writer of `name`; LockedError if another process (or object) is."""
        if name in self._lock_fds:
            raise LockedError(
                f"{name} on {self.describe()} is already open for writing by this store; "
                "close that writer first or open the posterior read-only (readonly=True)"
            )
        path = self._lock_path(name)
        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if holder == str(os.getpid()):
                raise LockedError(
                    f"{name} on {self.describe()} already has a writer in this process (another "
                    "posterior or SWAG object opened on the same path); close that one first, or "
                    "open this one read-only (readonly=True)"
                ) from None
            raise LockedError(
                f"{name} on {self.describe()} is being written by another process (pid {holder}); "
                "wait for it to finish, stop it, or open the posterior read-only (readonly=True)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fds[name] = fd

    def unlock(self, name: str) -> None:
        fd = self._lock_fds.pop(name, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _lock_path(self, name: str) -> Path:
        """Lock file for `name`: beside the data for file tiers; tiers without a directory
        override."""
        assert self.path is not None
        return self.path / f".{name}.lock"

    def close(self) -> None:
        """Release what the store holds. Writer locks stay held until `unlock` (a posterior's close)
        or the end of the process: a posterior still open keeps its single-writer guarantee."""

    def _check_writable(self) -> None:
        if self.readonly:
            raise StoreError(
                f"{self.describe()} was opened read-only; open it with readonly=False to write"
            )

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def open_lock_file(path: Path) -> int:
    """Open (creating) lock file `path`: a plain file of its own, never a link (open_plain)."""
    return open_plain(path, os.O_RDWR | os.O_CREAT)


def open_plain(path: Path, flags: int, one_name: bool = True) -> int:
    """Open a file a tier owns without following a link; for writing (O_WRONLY/O_RDWR), refuse
    anything but a plain file with one name (one_name=False: names the tier gave it itself are
    allowed), so that a planted symlink, hard link or device is never written through."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(
                f"{path} is a symbolic link; nvmlib never reads or writes a posterior's files "
                "through one: put the file itself there (cp --remove-destination TARGET LINK) or "
                "remove the link"
            ) from None
        raise StoreError(
            f"cannot open {path}: {exc.strerror}; check that it exists and its permissions"
        ) from exc
    st = os.fstat(fd)
    if flags & (os.O_WRONLY | os.O_RDWR) and (
        not stat.S_ISREG(st.st_mode) or one_name and st.st_nlink != 1
    ):
        os.close(fd)
        raise StoreError(
            f"{path} is not a plain file of its own (a device, or a hard link shared with another "
            "file); nvmlib will not write to it: replace it with a copy (cp) or remove it"
        )
    return fd


def refuse_links(root: Path) -> None:
    """StoreError if any entry below directory `root` is a symbolic link (a writer would write
    through it)."""
    for top, dirs, files in os.walk(root):
        for entry in dirs + files:
            if os.path.islink(os.path.join(top, entry)):
                raise StoreError(
                    f"{os.path.join(top, entry)} is a symbolic link inside the store {root}; "
                    "nvmlib never writes a posterior through one: replace it with what it points "
                    "to, or remove it"
                )


def private_dir() -> Path:
    """A directory only this user can write ($XDG_RUNTIME_DIR, else <tmp>/nvmlib-<uid>, mode 0700),
    for the locks of devices, which have no directory of their own."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = (
        Path(runtime) / "nvmlib"
        if runtime
        else Path(tempfile.gettempdir()) / f"nvmlib-{os.getuid()}"
    )
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise StoreError(f"cannot create the lock directory {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise StoreError(
            f"the lock directory {path} is not a directory that only you can write (a link, "
            "another user's, or group/world-writable); remove it and retry"
        )
    return path


# O_DIRECT's alignment of offsets, lengths and buffers (covers 512 B and 4 KiB sectors); a
# posterior pads its log rows and moments to it on every tier, so its layout is the same wherever it
# lies
ALIGN = 4096


def flat_index(shape: tuple[int, ...], start: int, n: int) -> tuple:
    """The index of elements start..start+n−1 (C order) of an array of `shape`: the leading
    indices and a slice of the last axis; StoreError when the range leaves one row of it."""
    last = shape[-1] if shape else 1
    size = int(np.prod(shape))
    if n < 0 or start < 0 or start + n > size or (n and start // last != (start + n - 1) // last):
        raise StoreError(
            f"elements {start}..{start + n} are not within one row of an array of shape {shape}"
        )
    lead = np.unravel_index(start // last, shape[:-1]) if len(shape) > 1 else ()
    a = start % last
    return tuple(int(i) for i in lead) + (slice(a, a + n),)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | str, huge: bool = False) -> np.ndarray:
    """An uninitialised array whose data starts on a page boundary, so O_DIRECT can use it as is;
    huge: ask for transparent huge pages (far fewer page faults when a large array is first
    touched)."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def release_pages(arr: np.ndarray) -> None:
    """Give back the memory of an aligned_empty array: it reads as zeros after, and its pages are
    taken again as it is written."""
    base: object = arr
    while not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else base.base  # type: ignore[attr-defined]
    base.madvise(mmap.MADV_REMOVE)


def padded_len(n: int, dtype: np.dtype | str, align: int) -> int:
    """Elements of a row of n `dtype` values padded to a multiple of `align` bytes."""
    size = np.dtype(dtype).itemsize
    return -(-n * size // align) * align // size if align > size else n


def check_fits(store: Store, need: int, what: str, reclaimable: int = 0) -> None:
    """Refuse, before any data is written, a request the tier has no room for."""
    free = store.free_bytes()
    if free is not None and need > free + reclaimable:
        raise StoreError(
            f"{store.describe()} is too small: {what} needs {need / 1e9:.3f} GB but only "
            f"{free / 1e9:.3f} GB is free; free some space, choose a larger tier or path, "
            "or keep fewer iterates (smaller max_rank / -K)"
        )
