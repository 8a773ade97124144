"""Shared fixtures: every available memory tier, opened on a fresh temporary path."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from nvmlib.backends import Store, available_tiers, open_store

# tier name -> how to open a store of it under a temporary directory (options: e.g. readonly=True)
TIER_OPENERS: dict[str, Callable[..., Store]] = {
    "dram": lambda tmp, **kw: open_store("dram", **kw),
    "mmap": lambda tmp, **kw: open_store("mmap", tmp / "mmap", **kw),
    "zarr": lambda tmp, **kw: open_store("zarr", tmp / "posterior.zarr", **kw),
}
DEVDAX_STANDIN_BYTES = 64 << 20
SHM = Path("/dev/shm") / "nvmlib-test"  # pmem-shm stores, one per test: <session tmp>-<test tmp>


def _pmem_devdax(tmp: Path, **options) -> Store:
    """pmem's devdax layout on a pre-sized regular file standing in for /dev/daxN.M."""
    device = tmp / "dax0.0"
    if tmp.is_dir() and not device.exists():
        with device.open("wb") as f:
            f.truncate(DEVDAX_STANDIN_BYTES)
    return open_store("pmem", device, device=True, **options)


def _pmem_shm(tmp: Path, **options) -> Store:
    """pmem on /dev/shm: with PMEM_IS_PMEM_FORCE=1 it runs the pmem_persist path of real hardware."""
    return open_store("pmem", SHM / f"{tmp.parent.name}-{tmp.name}", **options)


# PMEM_IS_PMEM_FORCE is read by libpmem when it is loaded, so it holds for a whole process:
# a plain session runs the pmem tier on its msync path; tests/test_pmem.py reruns the pmem
# tiers in a subprocess with PMEM_IS_PMEM_FORCE=1, which also adds "pmem-shm".
if available_tiers().get("pmem") == "ok":
    TIER_OPENERS["pmem"] = lambda tmp, **kw: open_store("pmem", tmp / "pmem", **kw)
    TIER_OPENERS["pmem-devdax"] = _pmem_devdax
    if Path("/dev/shm").is_dir() and os.environ.get("PMEM_IS_PMEM_FORCE") == "1":
        TIER_OPENERS["pmem-shm"] = _pmem_shm
if available_tiers().get("pymm") == "ok":
    TIER_OPENERS["pymm"] = lambda tmp, **kw: open_store("pymm", tmp / "pymm", size_mb=64, name=f"t{tmp.name}", **kw)

PERSISTENT = [k for k in TIER_OPENERS if k != "dram"]


@pytest.fixture(scope="session", autouse="pmem-shm" in TIER_OPENERS)
def _clean_shm(tmp_path_factory):
    """Remove what the pmem-shm stores of this session left in /dev/shm (it is RAM)."""
    yield
    for path in SHM.glob(f"{tmp_path_factory.getbasetemp().name}-*"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=list(TIER_OPENERS))
def store(request, tmp_path) -> Store:
    """A fresh store of each available tier."""
    st = TIER_OPENERS[request.param](tmp_path)
    yield st
    st.close()


@pytest.fixture(params=PERSISTENT)
def persistent_tier(request, tmp_path) -> tuple[str, Callable[..., Store]]:
    """(name, opener) of each persistent tier; the opener reopens the same place each call (options: readonly=True)."""
    return request.param, lambda **options: TIER_OPENERS[request.param](tmp_path, **options)
