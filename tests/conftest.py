"""Shared fixtures: every available memory tier of contract.TIERS, opened on a fresh temporary path
(for the tests not yet written as a contract.TierCase)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from contract import AVAILABLE, SHM, TIERS

from nvmlib.backends import Store


@pytest.fixture(scope="session", autouse=True)
def _clean_shm(tmp_path_factory):
    """Remove what the pmem-shm stores of this session left in /dev/shm (it is RAM)."""
    yield
    for path in SHM.glob(f"{tmp_path_factory.getbasetemp().name}-*"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=AVAILABLE)
def store(request, tmp_path) -> Store:
    """A fresh store of each available tier."""
    st = TIERS[request.param].open(tmp_path)
    yield st
    st.close()


@contextlib.contextmanager
def small_tmpfs(path: Path, size_mb: int):
    """A tmpfs of `size_mb` MB mounted at `path` (a real full disk); skips the test without root."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
