"""Helpers shared by tiers that keep each array in a file of a directory."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from nvmlib.errors import StoreError


def prepare_dir(path: Path, readonly: bool) -> Path:
    """Check (and, for writers, create) a store directory, with an error that says what to do."""
    path = Path(path).expanduser()
    if readonly:
        if not path.is_dir():
            raise StoreError(f"{path} is not a directory holding a posterior; check the path")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store directory {path}: {exc.strerror}; "
                         "choose a path you can write (e.g. --posterior_path under your home)") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"the store directory {path} is not writable; fix its permissions "
                         "or choose another path")
    return path


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def reserve(fd: int, offset: int, length: int, path: Path) -> None:
    """Allocate the blocks of a file up front so that a full disk fails now, not mid-run."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"no space left on the device of {path} for {length / 1e9:.3f} GB; "
                             "free space or choose another path") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
            raise


def os_error(exc: OSError, path: Path, doing: str) -> StoreError:
    """Translate an OSError from the hot path into a StoreError that names the file and a fix."""
    if exc.errno == errno.ENOSPC:
        return StoreError(f"the disk of {path} filled up while {doing}; the posterior up to the last "
                          "completed update is intact: free space and resume")
    return StoreError(f"{doing} {path} failed: {exc.strerror or exc}")
