"""Shared fixtures: every available memory tier of contract.TIERS, opened on a fresh temporary path
(for the tests not yet written as a contract.TierCase)."""

from __future__ import annotations

import shutil

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
