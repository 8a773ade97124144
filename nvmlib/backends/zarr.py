"""zarr tier: a zarr v3 group (local directory or any fsspec URL) so that a dask cluster can read
the posterior log where it lies. Rows are chunked one per chunk: an update writes one object.

zarr writes each object to a temporary file and renames it into place; in a local directory
`persist` makes those files and the directories above them durable (fsync), in that order."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from nvmlib.backends.base import Store, check_fits
from nvmlib.backends.files import disk_free, fsync_dir, prepare_dir
from nvmlib.errors import LockedError, StoreError


class ZarrStore(Store):
    """Arrays in a zarr v3 group; `url` may be a directory or e.g. "s3://bucket/posterior"."""

    kind = "zarr"

    def __init__(self, path: str | Path | None = None, readonly: bool = False,
                 storage_options: dict | None = None) -> None:
        if path is None:
            raise StoreError("the zarr tier needs a directory or URL: open_store('zarr', 'posterior.zarr')")
        self.url = str(path)
        self.local = "://" not in self.url
        super().__init__(prepare_dir(Path(path), readonly) if self.local else None, readonly)
        try:
            self.group = zarr.open_group(self.url, mode="r" if readonly else "a",
                                         storage_options=None if self.local else storage_options)
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise StoreError(f"cannot open the zarr store {self.url}: {exc}") from exc
        self._held: set[str] = set()
        self._dirty: dict[str, set[tuple[int, ...]]] = {}  # chunk (or shard) coordinates written since persist
        self._synced: set[Path] = set()  # directories whose own entry is durable
        self._arrays: dict[str, zarr.Array] = {}  # handles looked up so far

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self._check_writable()
        if name in self:
            raise StoreError(f"array {name!r} already exists in {self.url}")
        check_fits(self, int(np.prod(shape)) * np.dtype(dtype).itemsize, f"array {name!r}")
        chunks = (1,) + tuple(shape[1:]) if len(shape) > 1 else tuple(shape)
        self.group.create_array(name, shape=tuple(shape), dtype=dtype, chunks=chunks,
                                compressors=None, fill_value=0)
        if self.local:
            self._sync_up(self.path / name / "zarr.json")

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        super().write_rows(name, start, rows)
        if self.local:
            grid = self.array(name).metadata.chunk_grid.chunk_shape  # shards, when the array is sharded
            first, last = start // grid[0], (start + len(rows) - 1) // grid[0]
            rest = (0,) * (len(grid) - 1)
            self._dirty.setdefault(name, set()).update((i,) + rest for i in range(first, last + 1))

    def persist(self, name: str) -> None:
        """fsync the objects written to `name` since the last persist, then their directories."""
        coords = self._dirty.pop(name, set())
        if not coords:
            return
        meta = self.array(name).metadata
        dirs: set = set()
        for c in coords:
            file = self.path / name / meta.encode_chunk_key(c)
            if file.exists():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            dirs.add(file.parent)  # zarr renamed the object into it
            for d in file.parent.parents:  # and made any directory above it it lacked: once each
                if d in self._synced or not d.is_relative_to(self.path):
                    break
                dirs.add(d)
        for d in sorted(dirs, key=lambda p: -len(p.parts)):  # deepest first: each entry before its parent's
            if d.is_dir():
                fsync_dir(d)
        self._synced.update(dirs)

    def _sync_up(self, file: Path) -> None:
        """fsync a new object and every directory from its own up to the store's parent."""
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for d in file.parents:
            fsync_dir(d)
            if d == self.path.parent:
                break

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:  # each lookup reads the array's metadata: once per array
            try:
                self._arrays[name] = self.group[name]
            except KeyError:
                raise StoreError(f"{self.url} holds no array {name!r}") from None
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self._arrays or name in self.names()

    def names(self) -> list[str]:
        return sorted(self.group.array_keys())

    def delete(self, name: str) -> None:
        self._arrays.pop(name, None)
        if name in self.group:
            del self.group[name]
            self._dirty.pop(name, None)
            if self.local:
                fsync_dir(self.path)

    def free_bytes(self) -> int | None:
        return disk_free(self.path) if self.local else None

    def describe(self) -> str:
        return f"zarr tier at {self.url}"

    def _lock_path(self, name: str) -> Path:
        return self.path.parent / f".{self.path.name}.{name}.lock"  # zarr owns the inside

    def lock(self, name: str) -> None:
        """File lock for a local directory; object stores have none, so one writer per store object."""
        if self.local:
            return super().lock(name)
        if name in self._held:
            raise LockedError(f"{name} on {self.describe()} already has a writer in this process")
        self._held.add(name)

    def unlock(self, name: str) -> None:
        self._held.discard(name)
        super().unlock(name)
