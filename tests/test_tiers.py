"""The Store contract, run over every memory tier this machine offers (see conftest.TIER_OPENERS)."""
from __future__ import annotations

import numpy as np
import pytest

from nvmlib.errors import LockedError, StoreError
from conftest import TIER_OPENERS


def test_create_write_read_round_trip(store):
    store.create("x", (6, 4), "float32")
    assert "x" in store and store.names() == ["x"]
    assert store.shape("x") == (6, 4) and store.dtype("x") == np.float32
    assert not store.read_rows("x", 0, 6).any(), "a new array is zero-filled"
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    store.write_rows("x", 3, rows)
    store.persist("x")
    np.testing.assert_array_equal(store.read_rows("x", 3, 5), rows)
    out = np.empty((1, 4), np.float32)
    assert store.read_rows("x", 4, 5, out=out) is out
    np.testing.assert_array_equal(out, rows[1:])
    assert store.nbytes("x") == 6 * 4 * 4


@pytest.mark.parametrize("dtype", ["float16", "float64", "int64", "uint8"])
def test_dtype_and_shape_kept(store, dtype):
    store.create("a", (3, 2, 5), dtype)
    data = (np.arange(30) % 7).astype(dtype).reshape(3, 2, 5)
    store.write_rows("a", 0, data)
    back = store.read_rows("a", 0, 3)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 2, 5)
    np.testing.assert_array_equal(back, data)


def test_array_is_usable_in_place(store):
    store.create("v", (5,), "float64")
    store.array("v")[2] = 7.5
    store.persist("v")
    assert store.read_rows("v", 0, 5).tolist() == [0, 0, 7.5, 0, 0]


def test_delete(store):
    store.create("a", (4,), "int64")
    store.create("b", (4,), "int64")
    store.delete("a")
    assert store.names() == ["b"] and "a" not in store
    store.create("a", (2,), "uint8")  # the name (and the space) can be used again
    assert store.shape("a") == (2,)


def test_duplicate_create_refused(store):
    store.create("x", (2,), "float32")
    with pytest.raises(StoreError, match="already exists"):
        store.create("x", (2,), "float32")


def test_missing_array_is_a_clear_error(store):
    with pytest.raises(StoreError, match="no array 'nope'"):
        store.read_rows("nope", 0, 1)


def test_too_small_store_refused_before_writing(store):
    free = store.free_bytes()
    if free is None:
        pytest.skip(f"{store.describe()} does not know its free space")
    with pytest.raises(StoreError, match="too small"):  # twice what was free: other processes may free some meanwhile
        store.create("huge", (2 * free + (1 << 30),), "uint8")
    assert "huge" not in store


def test_second_writer_refused(store, request, tmp_path):
    store.lock("log")
    tier = request.node.callspec.params["store"]
    second = TIER_OPENERS[tier](tmp_path) if store.persistent else store
    with pytest.raises(LockedError, match="written by|already"):
        second.lock("log")
    store.unlock("log")
    second.lock("log")  # free again once the first writer lets go
    second.unlock("log")


def test_reopen_sees_the_data(persistent_tier):
    _, opener = persistent_tier
    first = opener()
    first.create("x", (3, 2), "float64")
    first.write_rows("x", 1, np.array([[1.5, -2.0]]))
    first.persist("x")
    first.close()
    again = opener()
    assert again.names() == ["x"] and again.shape("x") == (3, 2) and again.dtype("x") == np.float64
    np.testing.assert_array_equal(again.read_rows("x", 0, 3), [[0, 0], [1.5, -2.0], [0, 0]])
    again.close()


def test_readonly_store_refuses_writes(persistent_tier):
    _, opener = persistent_tier
    writer = opener()
    writer.create("x", (2,), "int64")
    writer.close()
    reader = opener(readonly=True)
    for write in (lambda: reader.create("y", (1,), "int64"),
                  lambda: reader.write_rows("x", 0, np.array([1]))):
        with pytest.raises(StoreError, match="read-only"):
            write()
    with pytest.raises(ValueError):
        reader.array("x")[0] = 1
    assert reader.read_rows("x", 0, 2).tolist() == [0, 0]
    reader.close()


def test_unwritable_path_is_a_clear_error(persistent_tier, tmp_path):
    name, _ = persistent_tier
    if name == "pmem-shm":
        pytest.skip("pmem-shm lives under /dev/shm, not tmp_path; the pmem tier runs this check")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=str(blocker)):
        TIER_OPENERS[name](blocker)



def test_lock_files_never_follow_links(store, tmp_path):
    """A symlink planted where a lock file goes is refused, and its target is left untouched."""
    if not store.persistent:
        pytest.skip("the dram tier has no lock file")
    target = tmp_path / "victim"
    target.write_text("precious")
    lock = store._lock_path("log")
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        store.lock("log")
    assert target.read_text() == "precious"
    lock.unlink()
    store.lock("log")  # a plain lock file works
    store.unlock("log")


def test_device_locks_live_in_a_private_directory(tmp_path):
    from nvmlib.backends.pmem import device_lock_path
    import os
    import stat
    where = device_lock_path(tmp_path / "dax0.0", "swag.log").parent
    st = os.lstat(where)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
