"""pymm tier: what can be checked without IBM PyMM (names, size accounting, detection).

The shelf itself (create/write/persist/reopen) is covered by tests/test_tiers.py, which
includes the pymm tier only where IBM PyMM is importable; it is not on this machine's CI.
"""
from __future__ import annotations

import sys

import pytest

from nvmlib.backends import available_tiers, open_store
from nvmlib.backends.pymm import (ITEM_OVERHEAD, SHELF_RESERVE, footprint, mangle, shelf_free_bytes,
                                  unmangle)
from nvmlib.errors import TierUnavailable
from nvmlib.swag import COMMIT, COUNT, LOG, META, MOMENTS, SHIFT

PYMM = available_tiers().get("pymm") == "ok"


@pytest.mark.parametrize("name", [LOG, META, COUNT, SHIFT, MOMENTS, COMMIT, "a_b", "x-1.y", "π"])
def test_names_mangle_to_identifiers_and_back(name):
    item = mangle(name)
    assert item.isidentifier() and not item.startswith("-")
    assert unmangle(item) == name


def test_mangling_is_injective_and_foreign_items_are_ignored():
    assert mangle("a_2e") != mangle("a.")
    assert unmangle("posterior_sums") is None and unmangle("nvmlib_size") is None


def test_free_bytes_accounts_for_every_array():
    size = 64 << 20
    empty = shelf_free_bytes(size, [])
    assert empty == size - SHELF_RESERVE - footprint(8)
    assert shelf_free_bytes(size, [1000, 3]) == empty - (1000 + ITEM_OVERHEAD) - (8 + ITEM_OVERHEAD)
    assert shelf_free_bytes(size, [size]) == 0


def test_a_posterior_too_big_for_the_shelf_is_refused_with_the_size_needed():
    from nvmlib.swag import SWAGPosterior
    need = SWAGPosterior.required_bytes(795_010, 3000)
    assert need > shelf_free_bytes(520 << 20, [])  # a 520 MB shelf cannot hold 3000 rows of model_2fc


@pytest.mark.skipif(PYMM, reason="IBM PyMM is installed here")
def test_missing_pymm_says_how_to_get_it():
    with pytest.raises(TierUnavailable, match="IBM PyMM.*github.com/IBM/mcas"):
        open_store("pymm", "/tmp/unused", size_mb=8)


@pytest.mark.skipif(PYMM, reason="IBM PyMM is installed here")
def test_an_unrelated_pymm_module_is_not_taken_for_ibm_pymm(tmp_path, monkeypatch):
    (tmp_path / "pymm.py").write_text('"""Stands for the unrelated PyPI package named pymm (a GUI)."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pymm", raising=False)
    with pytest.raises(TierUnavailable, match="is not IBM PyMM.*do not install it"):
        open_store("pymm", tmp_path / "shelf", size_mb=8)
