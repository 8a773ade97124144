"""pymm tier: IBM PyMM shelves (the paper's persistent-memory setting), fsdax or devdax.

Each array is a `pymm.ndarray` assigned to a shelf attribute. Array names are mangled into
identifiers (PyMM keys shelf items by attribute name), and the shelf size is kept on the
shelf in a small ndarray, because PyMM's shelf integers are unreliable. The shelf size is
fixed when it is created (size_mb, the paper's -s), so free_bytes accounts for it and
create refuses, before writing, an array the shelf has no room for.

What PyMM allows, and how this adapter keeps it from crashing the caller:
- One process at a time: PyMM takes a POSIX lock on the shelf's data file (`<name>.data`, or
  the devdax device) and aborts the process (SIGABRT) when another process holds it. The
  adapter takes that lock itself before calling PyMM and raises LockedError when it is held,
  so a reader cannot open a shelf beside a live writer process (read it after the writer
  closes, or in the writer's process). The lock is let go when the last store of the shelf in
  this process closes (PyMM itself would keep it until the process exits).
- In one process, stores of the same shelf share one PyMM shelf (PyMM cannot open it twice);
  the writer lock (Store.lock) still admits one writer.
- PyMM maps a shelf at a fixed address: each new shelf directory gets its own `load_addr`,
  and a shelf whose recorded address range is already in use in this process is refused.
- The first open of a directory in a process runs in a forked child first, so an abort in
  PyMM's C core becomes a StoreError instead of killing the caller.
- Backend `hstore-cc` persists on any directory (fsdax or not); `mapstore` keeps the shelf in
  this process's memory only: such a store reports persistent=False.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import fcntl
import gc
import hashlib
import io
import os
import random
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nvmlib.backends.base import Store, check_fits, flat_index
from nvmlib.backends.files import prepare_dir
from nvmlib.backends.pmem import device_lock_path
from nvmlib.backends.registry import TIERS
from nvmlib.errors import LockedError, StoreError, TierUnavailable

PREFIX = "nv_"  # shelf items nvmlib owns; others on a shared shelf are left alone
SIZE_ITEM = "nvmlib_size"  # int64 (1,): the shelf size in bytes, as created
ITEM_OVERHEAD = 4096  # bytes one item costs beyond its data (PyMM metadata header, allocator slack)
SHELF_RESERVE = 1 << 20  # bytes of the usable half its store (hstore) keeps for itself (estimate)
LARGE_ITEM = (
    8 << 20
)  # items this big are placed in whole blocks of this size (measured, see footprint)
ENGINES = ("hstore-cc", "mapstore")
# where new shelf directories are placed in the address space: 16..80 TiB, clear of the heap
# (0x55..., PIE), shared libraries and thread stacks (0x7f...); one window per directory, room
# for four shelves of the first one's size (PyMM places a directory's next shelves after it)
ADDR_LOW, ADDR_HIGH, ADDR_ALIGN, ADDR_WINDOW = 0x1000_0000_0000, 0x5000_0000_0000, 1 << 30, 16 << 30


def mangle(name: str) -> str:
    """An identifier for `name`: ASCII letters and digits kept, every other UTF-8 byte as _XX
    (hex)."""
    return PREFIX + "".join(
        chr(b) if chr(b).isalnum() and b < 128 else f"_{b:02x}" for b in name.encode()
    )


def unmangle(item: str) -> str | None:
    """The array name behind a shelf item, or None when the item is not nvmlib's."""
    if not item.startswith(PREFIX):
        return None
    body, out, i = item[len(PREFIX) :], bytearray(), 0
    while i < len(body):
        if body[i] == "_":
            out.append(int(body[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(body[i]))
            i += 1
    return out.decode()


def footprint(nbytes: int) -> int:
    """Bytes an array of `nbytes` takes from a shelf: data rounded to 8 plus its metadata, and
    large arrays rounded up to whole LARGE_ITEM blocks."""
    size = -(-nbytes // 8) * 8 + ITEM_OVERHEAD
    return -(-size // LARGE_ITEM) * LARGE_ITEM if nbytes >= LARGE_ITEM else size


def shelf_free_bytes(size_bytes: int, array_nbytes: list[int]) -> int:
    """Bytes a shelf of `size_bytes` still has once arrays of these sizes are on it.

    Only half the shelf counts: hstore-cc's allocator fails to place items well below the shelf
    size (measured on a 256 MB shelf: 100 MB placed, 128 MB or 60 + 64 MB not; 512 MB: not 256 MB;
    1024 MB: 760 MB, not 300 + 400 MB), and PyMM then crashes the process (it writes through the
    null pointer of the failed allocation), so nvmlib refuses an array before PyMM can fail."""
    used = footprint(8) + sum(footprint(n) for n in array_nbytes)
    return max(0, size_bytes // 2 - SHELF_RESERVE - used)


@contextlib.contextmanager
def quiet(errors: list[str] | None = None) -> Iterator[None]:
    """Send stdout to /dev/null at the file-descriptor level: PyMM's C core prints a banner on
    import and Python notes for every item, which would corrupt output a caller parses.
    errors: capture stderr too (PyMM logs every shelf it opens there) and append its text."""
    sys.stdout.flush()
    sys.stderr.flush()
    fds = (1, 2) if errors is not None else (1,)
    saved = [os.dup(fd) for fd in fds]
    sinks = [open(os.devnull, "wb"), tempfile.TemporaryFile()][: len(fds)]
    for fd, sink in zip(fds, sinks, strict=True):
        os.dup2(sink.fileno(), fd)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        ctypes.CDLL(None).fflush(
            None
        )  # C stdio buffers what it prints to a pipe: drop it here, not later
        for fd, old in zip(fds, saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        if errors is not None:
            sinks[1].seek(0)
            errors.append(sinks[1].read().decode(errors="replace"))
        for sink in sinks:
            sink.close()


def _module() -> Any:
    """IBM's PyMM module, or TierUnavailable that says how to get it."""
    hint = TIERS["pymm"][1]
    try:
        with quiet():
            import pymm
    except ImportError as exc:
        raise TierUnavailable(
            f"the pymm tier needs IBM PyMM, which is not importable ({exc}): {hint}"
        ) from exc
    if not (callable(getattr(pymm, "shelf", None)) and hasattr(pymm, "ndarray")):
        raise TierUnavailable(
            f"the 'pymm' module at {getattr(pymm, '__file__', '?')} is not IBM PyMM "
            f"(it has no pymm.shelf / pymm.ndarray): {hint}"
        )
    return pymm


# ---- process-wide state: PyMM's own is per process ----------------------------------------------
@dataclass
class _Shelf:
    """One PyMM shelf open in this process, shared by every store opened on it."""

    shelf: Any
    engine: str
    lock_fd: int | None  # fd on the data file holding the POSIX lock PyMM takes (None: mapstore)
    users: int = 1


_open: dict[tuple[str, str], _Shelf] = {}  # (directory or device, shelf name) -> the shelf
_loaded: set[tuple[str, str]] = (
    set()
)  # (engine, path) PyMM has loaded here (it keeps them until exit)
_names: dict[str, str] = {}  # hstore shelf name -> its directory: PyMM keeps both until exit
_windows: list[tuple[int, int]] = []  # address ranges handed out as load_addr in this process


def _mapped() -> list[tuple[int, int]]:
    """Address ranges mapped in this process (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = line.split(None, 1)[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _overlap(lo: int, hi: int, ranges: list[tuple[int, int]]) -> tuple[int, int] | None:
    return next(((a, b) for a, b in ranges if a < hi and lo < b), None)


def load_address(size_bytes: int) -> int:
    """A load_addr for a new shelf directory: a window of address space that nothing in this
    process uses, chosen at random so that shelves made by different processes rarely share one."""
    window = max(ADDR_WINDOW, -(-4 * size_bytes // ADDR_ALIGN) * ADDR_ALIGN)
    taken = _mapped() + _windows
    for _ in range(256):
        base = (
            ADDR_LOW + random.randrange((ADDR_HIGH - ADDR_LOW - window) // ADDR_ALIGN) * ADDR_ALIGN
        )
        if _overlap(base, base + window, taken) is None:
            _windows.append((base, base + window))
            return base
    raise StoreError(
        f"no free {window >> 30} GiB of address space for a PyMM shelf in this process; "
        "close other shelves or open this one in its own process"
    )


def recorded_ranges(map_file: Path) -> list[tuple[int, int]]:
    """The address ranges a shelf was created at, from its map file (`<name>.map`: addr size
    lines)."""
    try:
        fields = map_file.read_text().split()
    except OSError:
        return []
    return [
        (int(a, 0), int(a, 0) + int(s, 0)) for a, s in zip(fields[::2], fields[1::2], strict=False)
    ]


def lock_holder(path: Path) -> str:
    """The pid holding a POSIX lock on `path`, from /proc/locks, or 'unknown'."""
    ino = path.stat().st_ino
    with contextlib.suppress(OSError), open("/proc/locks") as locks:
        for fields in map(str.split, locks):
            if "POSIX" in fields and len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(ino):
                return fields[4]
    return "unknown"


def take_lock(data: Path, what: str) -> int:
    """An fd on `data` holding its POSIX lock (the one PyMM takes); LockedError when another
    process holds it, before PyMM is called (PyMM would abort this process)."""
    fd = os.open(data, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LockedError(
            f"{what} is open in another process (pid {lock_holder(data)}); PyMM lets one process "
            "at a time open a shelf, readers included: wait for it to close the shelf or stop it, "
            "or read the posterior inside that process"
        ) from None
    return fd


def in_child(action: Callable[[], None], what: str) -> None:
    """Run `action` in a forked child: StoreError with its stderr when it fails or PyMM aborts it.

    PyMM maps shelves with MADV_DONTFORK: the child has none of this process's shelf memory, so it
    must not finalise this process's objects (PyMM's shelf calls gc.collect(), and a PyMM array
    left in a garbage cycle, a closed store's array held by a dropped traceback, then persists
    memory the child does not have: SIGSEGV). gc.freeze() puts them all out of the collector's
    reach."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only PyMM calls, then leave without running any cleanup
        gc.freeze()
        code = 1
        try:
            # an abort here is expected and reported: no traceback dump on the caller's tty
            faulthandler.disable()
            os.close(read_end)
            os.dup2(write_end, 2)
            with quiet():
                action()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent through the pipe
            os.write(2, f"{type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        err = pipe.read().decode(errors="replace").strip()
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0:
        how = (
            f"was killed by {signal.Signals(-status).name}"
            if status < 0
            else f"failed (exit {status})"
        )
        tail = " | ".join(err.splitlines()[-3:]) or "no message"
        raise StoreError(
            f"PyMM {how} opening {what}: {tail}; check the path, the engine and that the "
            "shelf fits the device, or recreate it (force_new=True, train: --overwrite)"
        )


def default_name(path: Path) -> str:
    """The shelf name nvmlib uses at `path`: derived from the path, since PyMM lets a process open
    one shelf per name; a directory moved elsewhere keeps its one nvmlib shelf."""
    made = sorted(path.glob("nvmlib*.data")) if path.is_dir() else []
    if len(made) == 1:
        return made[0].name[: -len(".data")]
    return "nvmlib_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]


class PymmStore(Store):
    """Arrays as pymm.ndarray items of one PyMM shelf."""

    kind = "pymm"

    def __init__(
        self,
        path: str | Path | None = None,
        readonly: bool = False,
        size_mb: int = 1024,
        name: str | None = None,
        engine: str = "hstore-cc",
        force_new: bool = False,
    ) -> None:
        """path: the shelf's pmem_path (an fsdax directory or a devdax device); size_mb: the paper's
        -s; name: the shelf's name (default: default_name(path)); engine: hstore-cc (persists) or
        mapstore (this process's memory only)."""
        if path is None:
            raise StoreError(
                "the pymm tier needs a pmem_path: open_store('pymm', '/mnt/pmem0', size_mb=520000) "
                "or open_store('pymm', '/dev/dax0.0', size_mb=...)"
            )
        if engine not in ENGINES:
            raise StoreError(
                f"PyMM engine (its backend=) {engine!r} is not one of {', '.join(ENGINES)}: "
                "hstore-cc persists the shelf, mapstore keeps it in this process's memory only"
            )
        path = Path(path).expanduser()
        self._device = path.exists() and stat.S_ISCHR(path.stat().st_mode)
        super().__init__(
            path.resolve() if self._device else prepare_dir(path, readonly).resolve(), readonly
        )
        self.shelf_name, self.engine = name or default_name(self.path), engine
        self.persistent = engine != "mapstore"  # mapstore: nothing outlives the process
        self._pymm = _module()
        self._key = (str(self.path), self.shelf_name)
        shared = _open.get(self._key)
        if shared is None:
            shared = _open[self._key] = self._open_shelf(int(size_mb), force_new)
        elif shared.engine != engine or force_new:
            raise LockedError(
                f"{self.describe()} is already open in this process (PyMM engine {shared.engine}); "
                "close that store first to recreate it or change its engine"
            )
        else:
            shared.users += 1
        self._shelf = shared.shelf
        if getattr(self._shelf, SIZE_ITEM) is None and not readonly:
            with quiet():
                setattr(self._shelf, SIZE_ITEM, np.array([int(size_mb) << 20], dtype=np.int64))
        size = getattr(self._shelf, SIZE_ITEM)
        self.size_bytes = int(size[0]) if size is not None else int(size_mb) << 20
        self._dirty: dict[str, tuple[int, int]] = {}  # element range written since persist

    def _open_shelf(self, size_mb: int, force_new: bool) -> _Shelf:
        """Open the shelf with PyMM, after the checks that keep PyMM from aborting this process."""
        what = self.describe()
        data = self.path if self._device else self.path / f"{self.shelf_name}.data"
        files = self.engine != "mapstore"
        loaded = (
            self.engine,
            str(self.path),
        ) in _loaded  # PyMM keeps a directory's store once loaded
        seen = _names.get(self.shelf_name) == str(
            self.path
        )  # this shelf was open here before: still mapped
        if files and self.shelf_name in _names and not seen:
            raise StoreError(
                f"this process already opened a PyMM shelf named {self.shelf_name!r} (at "
                f"{_names[self.shelf_name]}), and PyMM keeps that name until the process exits: "
                "give this shelf another name (name=...) or open it in another process"
            )
        if files and not seen and not self._device:
            clash = [
                (r, _overlap(*r, _mapped()))
                for r in recorded_ranges(self.path / f"{self.shelf_name}.map")
            ]
            clash = [(r, o) for r, o in clash if o is not None]
            if clash:
                (lo, hi), (a, b) = clash[0]
                raise StoreError(
                    f"{what} was created at addresses {lo:#x}-{hi:#x}, which this process already "
                    f"uses ({a:#x}-{b:#x}, another shelf or library); open it in a process of its "
                    "own, or recreate it (force_new=True, train: --overwrite)"
                )
        options = dict(size_mb=size_mb, pmem_path=str(self.path), backend=self.engine)
        if not loaded:
            options["load_addr"] = hex(load_address(size_mb << 20))
        if files and not loaded:
            if data.exists():
                os.close(take_lock(data, what))  # free now: the child below must be able to take it
            in_child(
                lambda: self._pymm.shelf(self.shelf_name, force_new=force_new, **options), what
            )
            force_new = False  # the child made it new
        lock_fd = take_lock(data, what) if files and data.exists() else None
        log: list[str] = []
        try:
            with quiet(log):
                shelf = self._pymm.shelf(self.shelf_name, force_new=force_new, **options)
        except Exception as exc:  # PyMM raises RuntimeError and others from its C core
            if lock_fd is not None:
                os.close(lock_fd)
            tail = " | ".join("".join(log).strip().splitlines()[-3:])
            raise StoreError(
                f"PyMM could not open {what} ({size_mb} MB, {self.engine}): {exc} [{tail}]; "
                "check the path, the engine and that the shelf fits the device"
            ) from exc
        _loaded.add((self.engine, str(self.path)))
        if files:
            _names[self.shelf_name] = str(self.path)
        if (
            files and lock_fd is None and data.exists()
        ):  # created just now: hold its lock like the others
            lock_fd = take_lock(data, what)
        return _Shelf(shelf, self.engine, lock_fd)

    @classmethod
    def check_available(cls) -> None:
        _module()

    def _item(self, name: str) -> Any:
        item = getattr(self._shelf, mangle(name))
        if item is None:
            raise StoreError(
                f"the shelf {self.shelf_name!r} at {self.path} holds no array {name!r}"
            )
        return item

    def create(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        """A new zero-filled array on the shelf, whole from the start (sparse is ignored: a shelf
        does not grow, so a compressed log there takes its worst case)."""
        self._check_writable()
        if name in self.names():
            raise StoreError(
                f"array {name!r} already exists on shelf {self.shelf_name!r}; delete it first"
            )
        check_fits(
            self, footprint(int(np.prod(shape)) * np.dtype(dtype).itemsize), f"array {name!r}"
        )
        with quiet():
            setattr(
                self._shelf,
                mangle(name),
                self._pymm.ndarray(tuple(shape), dtype=np.dtype(dtype), zero=True),
            )

    def array(self, name: str) -> np.ndarray:
        view = self._item(name).view(np.ndarray)
        if self.readonly:
            view.flags.writeable = False
        else:
            self._dirty[name] = (0, view.size)
        return view

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._item(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return self._item(name).dtype

    def names(self) -> list[str]:
        return sorted(n for n in map(unmangle, self._shelf.items) if n is not None)

    def delete(self, name: str) -> None:
        self._check_writable()
        self._dirty.pop(name, None)
        try:
            with quiet():
                self._shelf.erase(mangle(name))
        except RuntimeError as exc:
            raise StoreError(
                f"PyMM cannot erase {name!r}: {exc}; drop every array you took from "
                "store.array() before deleting"
            ) from exc

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        self._check_writable()
        item = self._item(name)
        n_rows = item.shape[0] if item.ndim else 1
        if start < 0 or start + len(rows) > n_rows:
            raise StoreError(
                f"rows {start}..{start + len(rows)} are outside {name!r} of {n_rows} rows"
            )
        item.view(np.ndarray)[start : start + len(rows)] = rows
        per_row = item.size // max(n_rows, 1)
        self._note(name, start * per_row, (start + len(rows)) * per_row)

    def write_flat(self, name: str, start: int, values: np.ndarray) -> None:
        self._check_writable()
        item = self._item(name)
        item.view(np.ndarray)[flat_index(item.shape, start, len(values))] = values
        self._note(name, start, start + len(values))

    def readable(self, name: str) -> np.ndarray:
        """A read-only view: reading marks nothing for the next persist."""
        view = self._item(name).view(np.ndarray)
        view.flags.writeable = False
        return view

    def _note(self, name: str, lo: int, hi: int) -> None:
        """Elements lo..hi−1 of `name` were written: the next persist covers them."""
        old = self._dirty.get(name)
        self._dirty[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def persist(self, name: str) -> None:
        if self.readonly or name not in self._dirty:
            return
        lo, hi = self._dirty.pop(name)
        self._item(name).persist_offset(lo, hi - lo)

    def free_bytes(self) -> int | None:
        return shelf_free_bytes(self.size_bytes, [self.nbytes(n) for n in self.names()])

    def describe(self) -> str:
        volatile = "" if self.persistent else " (mapstore: kept in this process's memory only)"
        return f"pymm shelf {self.shelf_name!r} at {self.path}{volatile}"

    def _lock_path(self, name: str) -> Path:
        if self._device:
            return device_lock_path(self.path, f"{self.shelf_name}.{name}")
        return self.path / f".{self.shelf_name}.{name}.lock"

    def close(self) -> None:
        if self._shelf is None:
            return
        for name in list(self._dirty):
            self.persist(name)
        self._shelf = None
        shared = _open[self._key]
        shared.users -= 1
        if shared.users == 0:
            del _open[self._key]
            with quiet():
                shared.shelf = None  # PyMM closes the pool when its shelf goes
            if shared.lock_fd is not None:
                os.close(
                    shared.lock_fd
                )  # closing any fd on the file drops this process's POSIX locks, PyMM's too
        super().close()
