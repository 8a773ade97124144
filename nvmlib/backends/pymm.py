"""pymm tier: IBM PyMM shelves (the paper's persistent-memory setting), fsdax or devdax.

Each array is a `pymm.ndarray` assigned to a shelf attribute. Array names are mangled into
identifiers (PyMM keys shelf items by attribute name), and the shelf size is kept on the
shelf in a small ndarray, because PyMM's shelf integers are unreliable. The shelf size is
fixed when it is created (size_mb, the paper's -s), so free_bytes accounts for it and
create refuses, before writing, an array the shelf has no room for.
"""
from __future__ import annotations

import contextlib
import io
import stat
from pathlib import Path
from typing import Any

import numpy as np

from nvmlib.backends.base import Store, check_fits
from nvmlib.backends.files import prepare_dir
from nvmlib.backends.pmem import device_lock_path
from nvmlib.backends.registry import TIERS
from nvmlib.errors import StoreError, TierUnavailable

PREFIX = "nv_"            # shelf items nvmlib owns; others on a shared shelf are left alone
SIZE_ITEM = "nvmlib_size"  # int64 (1,): the shelf size in bytes, as created
ITEM_OVERHEAD = 4096      # bytes one item costs beyond its data (PyMM metadata header, allocator slack)
SHELF_RESERVE = 1 << 20   # bytes of a shelf its store (hstore) keeps for itself (estimate)


def mangle(name: str) -> str:
    """An identifier for `name`: ASCII letters and digits kept, every other UTF-8 byte as _XX (hex)."""
    return PREFIX + "".join(chr(b) if chr(b).isalnum() and b < 128 else f"_{b:02x}" for b in name.encode())


def unmangle(item: str) -> str | None:
    """The array name behind a shelf item, or None when the item is not nvmlib's."""
    if not item.startswith(PREFIX):
        return None
    body, out, i = item[len(PREFIX):], bytearray(), 0
    while i < len(body):
        if body[i] == "_":
            out.append(int(body[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(body[i]))
            i += 1
    return out.decode()


def footprint(nbytes: int) -> int:
    """Bytes an array of `nbytes` takes from a shelf (data rounded to 8, plus its metadata)."""
    return -(-nbytes // 8) * 8 + ITEM_OVERHEAD


def shelf_free_bytes(size_bytes: int, array_nbytes: list[int]) -> int:
    """Bytes a shelf of `size_bytes` still has once arrays of these sizes are on it."""
    return max(0, size_bytes - SHELF_RESERVE - footprint(8) - sum(footprint(n) for n in array_nbytes))


def _module() -> Any:
    """IBM's PyMM module, or TierUnavailable that says how to get it."""
    hint = TIERS["pymm"][1]
    try:
        import pymm
    except ImportError as exc:
        raise TierUnavailable(f"the pymm tier needs IBM PyMM, which is not importable ({exc}): {hint}") from exc
    if not (callable(getattr(pymm, "shelf", None)) and hasattr(pymm, "ndarray")):
        raise TierUnavailable(f"the 'pymm' module at {getattr(pymm, '__file__', '?')} is not IBM PyMM "
                              f"(it has no pymm.shelf / pymm.ndarray): {hint}")
    return pymm


@contextlib.contextmanager
def _quiet():
    """PyMM prints a line for every item it makes or finds; keep the user's output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class PymmStore(Store):
    """Arrays as pymm.ndarray items of one PyMM shelf."""

    kind = "pymm"

    def __init__(self, path: str | Path | None = None, readonly: bool = False, size_mb: int = 1024,
                 name: str = "nvmlib", backend: str = "hstore-cc", force_new: bool = False) -> None:
        """path: the shelf's pmem_path (an fsdax directory or a devdax device); size_mb: the paper's -s."""
        if path is None:
            raise StoreError("the pymm tier needs a pmem_path: open_store('pymm', '/mnt/pmem0', size_mb=520000) "
                             "or open_store('pymm', '/dev/dax0.0', size_mb=...)")
        path = Path(path).expanduser()
        self._device = path.exists() and stat.S_ISCHR(path.stat().st_mode)
        super().__init__(path if self._device else prepare_dir(path, readonly), readonly)
        self.shelf_name = name
        pymm = _module()
        try:
            with _quiet():
                self._shelf = pymm.shelf(name, size_mb=int(size_mb), pmem_path=str(self.path),
                                         backend=backend, force_new=force_new)
        except Exception as exc:  # PyMM raises RuntimeError and others from its C core
            raise StoreError(f"PyMM could not open shelf {name!r} at {self.path} ({size_mb} MB, {backend}): "
                             f"{exc}; check the path, the backend and that the shelf fits the device") from exc
        self._pymm = pymm
        if getattr(self._shelf, SIZE_ITEM) is None and not readonly:
            with _quiet():
                setattr(self._shelf, SIZE_ITEM, np.array([int(size_mb) << 20], dtype=np.int64))
        size = getattr(self._shelf, SIZE_ITEM)
        self.size_bytes = int(size[0]) if size is not None else int(size_mb) << 20
        self._dirty: dict[str, tuple[int, int]] = {}  # element range written since persist

    @classmethod
    def check_available(cls) -> None:
        _module()

    def _item(self, name: str) -> Any:
        item = getattr(self._shelf, mangle(name))
        if item is None:
            raise StoreError(f"the shelf {self.shelf_name!r} at {self.path} holds no array {name!r}")
        return item

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self._check_writable()
        if name in self.names():
            raise StoreError(f"array {name!r} already exists on shelf {self.shelf_name!r}; delete it first")
        check_fits(self, int(np.prod(shape)) * np.dtype(dtype).itemsize, f"array {name!r}")
        with _quiet():
            setattr(self._shelf, mangle(name), self._pymm.ndarray(tuple(shape), dtype=np.dtype(dtype), zero=True))

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
            with _quiet():
                self._shelf.erase(mangle(name))
        except RuntimeError as exc:
            raise StoreError(f"PyMM cannot erase {name!r}: {exc}; drop every array you took from "
                             "store.array() before deleting") from exc

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        self._check_writable()
        item = self._item(name)
        n_rows = item.shape[0] if item.ndim else 1
        if start < 0 or start + len(rows) > n_rows:
            raise StoreError(f"rows {start}..{start + len(rows)} are outside {name!r} of {n_rows} rows")
        item.view(np.ndarray)[start:start + len(rows)] = rows
        per_row = item.size // max(n_rows, 1)
        lo, hi = start * per_row, (start + len(rows)) * per_row
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
        return f"pymm shelf {self.shelf_name!r} at {self.path}"

    def _lock_path(self, name: str) -> Path:
        if self._device:
            return device_lock_path(self.path, f"{self.shelf_name}.{name}")
        return self.path / f".{self.shelf_name}.{name}.lock"

    def close(self) -> None:
        for name in list(self._dirty):
            self.persist(name)
        self._shelf = None
        super().close()
