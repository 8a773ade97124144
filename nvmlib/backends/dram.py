"""DRAM tier: numpy arrays in RAM (also the paper's "DRAM + Optane memory mode" setting)."""
from __future__ import annotations

import threading
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


class DramStore(Store):
    """Arrays live in this process's memory; nothing survives the process."""

    kind = "dram"
    persistent = False

    def __init__(self, path: str | Path | None = None, readonly: bool = False) -> None:
        super().__init__(None, readonly)
        self._arrays: dict[str, np.ndarray] = {}
        self._locked: set[str] = set()
        self._mutex = threading.Lock()

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self._check_writable()
        if name in self._arrays:
            raise StoreError(f"array {name!r} already exists in the dram tier")
        check_fits(self, int(np.prod(shape)) * np.dtype(dtype).itemsize, f"array {name!r}")
        arr = aligned_empty(tuple(shape), dtype, huge=True)
        arr.fill(0)  # touch every page now, not on the first update (np.zeros maps lazily): on a VM a
        # first touch costs milliseconds per MB, which would otherwise land in the epochs
        self._arrays[name] = arr

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
                raise LockedError(f"{name} in this dram store already has a writer; close it first "
                                  "or open the posterior read-only (readonly=True)")
            self._locked.add(name)

    def unlock(self, name: str) -> None:
        self._locked.discard(name)

    def close(self) -> None:
        self._locked.clear()
