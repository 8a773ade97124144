"""pmem tier specifics: the devdax table, the pmem_persist path, libpmem missing."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvmlib.backends import available_tiers, libpmem, open_store
from nvmlib.backends.base import private_dir
from nvmlib.backends.pmem import DATA_START, SLOT_BYTES, device_lock_path
from nvmlib.errors import StoreError, TierUnavailable

pytestmark = pytest.mark.skipif(
    available_tiers().get("pmem") != "ok", reason="libpmem is not installed"
)
ROOT = Path(__file__).resolve().parents[1]


def _device(tmp_path: Path, nbytes: int = 8 << 20) -> Path:
    dev = tmp_path / "dax1.0"
    with dev.open("wb") as f:
        f.truncate(nbytes)
    return dev


def test_fsdax_files_are_npy(tmp_path):
    with open_store("pmem", tmp_path) as st:
        st.create("x", (3, 2), "float32")
        st.write_rows("x", 1, np.ones((1, 2), np.float32))
        st.persist("x")
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), [[0, 0], [1, 1], [0, 0]])


def test_devdax_allocates_reuses_and_counts_free_space(tmp_path):
    with open_store("pmem", _device(tmp_path), device=True) as st:
        total = st.free_bytes()
        assert total == (8 << 20) - DATA_START
        st.create("a", (1000,), "uint8")  # rounded up to one 4 KiB block
        st.create("b", (2, 4096), "uint8")
        assert st.free_bytes() == total - 3 * 4096
        st.write_rows("b", 0, np.full((2, 4096), 9, np.uint8))
        st.delete("a")
        st.create("c", (10,), "int64")  # reuses a's hole, zero-filled
        assert st._layout.table["c"].offset == DATA_START
        assert not st.read_rows("c", 0, 10).any() and (st.read_rows("b", 0, 2) == 9).all()
        with pytest.raises(StoreError, match="too small"):
            st.create("big", (8 << 20,), "uint8")


def test_devdax_torn_table_update_keeps_previous_table(tmp_path):
    dev = _device(tmp_path)
    with open_store("pmem", dev, device=True) as st:
        st.create("a", (4,), "int64")
        st.create("b", (4,), "int64")  # table seq 3 lives in slot 1
        seq = st._layout.seq
    with dev.open("r+b") as f:  # tear the newest slot's body
        f.seek((seq % 2) * SLOT_BYTES + 40)
        f.write(b"\xff" * 8)
    with open_store("pmem", dev, device=True, readonly=True) as st:
        assert st.names() == ["a"]


def test_devdax_lock_lives_in_a_private_dir_keyed_by_device(tmp_path):
    dev = _device(tmp_path)
    with open_store("pmem", dev, device=True) as st:
        st.lock("swag.log")
        lock = device_lock_path(dev, "swag.log")
        assert lock.parent == private_dir() and str(dev).strip("/").replace("/", "_") in lock.name
        assert lock.read_text() == str(os.getpid())


def test_devdax_path_errors(tmp_path):
    with pytest.raises(StoreError, match="ndctl create-namespace -m devdax"):
        open_store("pmem", tmp_path / "dax9.9", device=True)
    with pytest.raises(StoreError, match="at least"):
        open_store("pmem", _device(tmp_path, 4096), device=True)
    with pytest.raises(StoreError, match="holds no nvmlib arrays"):
        open_store("pmem", _device(tmp_path), device=True, readonly=True)


def test_missing_libpmem_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libpmem-not-here.so.1")
    libpmem.lib.cache_clear()
    try:
        with pytest.raises(TierUnavailable, match="apt-get install libpmem1"):
            open_store("pmem", "/tmp/unused")
    finally:
        libpmem.lib.cache_clear()


@pytest.mark.skipif(
    os.environ.get("PMEM_IS_PMEM_FORCE") != "1", reason="runs in the subprocess below"
)
def test_forced_mapping_takes_the_pmem_persist_path(tmp_path):
    with open_store("pmem", tmp_path) as st:
        st.create("x", (4,), "float64")
        st.write_rows("x", 0, np.arange(4.0))
        assert st._entry("x")[0].is_pmem
        st.persist("x")


@pytest.mark.parametrize("device", [False, True], ids=["fsdax", "devdax"])
def test_reads_leave_the_next_persist_to_what_was_written(tmp_path, device):
    """Reading rows, columns or a flat range (a reopen reads the log's trailers) must not mark the
    array as handed out for writing: the next persist then flushes the row written, not the whole
    log (on persistent memory, every cache line of it)."""
    where = _device(tmp_path) if device else tmp_path
    with open_store("pmem", where, device=device) as st:
        st.create("log", (64, 512), "float32")
        st.write_rows("log", 3, np.ones((1, 512), np.float32))
        st.read_rows("log", 0, 64)
        st.read_cols("log", 0, 64, 508, 512)
        st.read_flat("log", 0, 512)
        assert "log" not in st._exposed
        assert st._dirty["log"] == (st._span("log", 3, 4)[0], st._span("log", 4, 5)[0])
        with pytest.raises(ValueError, match="read-only"):
            st.readable("log")[0, 0] = 1


@pytest.mark.skipif(os.environ.get("PMEM_IS_PMEM_FORCE") == "1", reason="already forced")
def test_pmem_tiers_with_pmem_is_pmem_force(tmp_path):
    """Rerun every pmem test with PMEM_IS_PMEM_FORCE=1: pmem_memcpy_nodrain/drain/persist, and
    /dev/shm (the compressed log's kill tests run once, unforced: its writes go through the same
    store calls)."""
    env = {**os.environ, "PMEM_IS_PMEM_FORCE": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "-k",
            "pmem and not delta",
            "tests/test_tiers.py",
            "tests/test_pmem.py",
            "tests/test_crash.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "TestPmemShm::test_create_write_read_round_trip PASSED" in run.stdout, run.stdout[-3000:]
