"""The zarr tier's sharded log: the shards nvmlib writes itself are the bytes zarr would write and
plain zarr reads them; a writer cut off at any step of a shard's life leaves every row it wrote
readable, a reopened writer goes on from there, and no published shard is ever written in place."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from nvmlib import SWAGPosterior, open_store
from nvmlib.backends import zarr as zarr_tier

COLS, ROWS = 1024, 23  # 4 KiB rows: 4 per shard, a last shard of 3
SHARD = 4 * COLS * 4


def rows(seed: int, n: int = ROWS) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, COLS)).astype(np.float32)


def new_log(path):
    store = open_store("zarr", path, shard_bytes=SHARD)
    store.create_log("x.log", (ROWS, COLS), "float32")
    return store


@pytest.mark.parametrize("inner_rows", [1, 2])
def test_shards_are_zarrs_own_bytes_and_plain_zarr_reads_them(tmp_path, monkeypatch, inner_rows):
    """Inner chunks of one row, and of two (a small model's layout)."""
    monkeypatch.setattr(zarr_tier, "INNER_BYTES", inner_rows * COLS * 4)
    data = rows(1)
    store = new_log(tmp_path / "p.zarr")
    for i in range(ROWS):
        store.write_rows("x.log", i, data[i : i + 1])
    store.persist("x.log")
    log = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["x.log"]
    assert log.shards == (4, COLS) and log.chunks == (inner_rows, COLS)
    np.testing.assert_array_equal(log[:], data)  # every shard complete, the short last one too
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w").create_array(
        "x.log",
        shape=(ROWS, COLS),
        dtype="float32",
        chunks=log.chunks,
        shards=log.shards,
        compressors=None,
        fill_value=0,
    )
    ref[:] = data
    for shard in range(6):
        key = f"x.log/c/{shard}/0"
        assert (tmp_path / "p.zarr" / key).read_bytes() == (
            tmp_path / "ref.zarr" / key
        ).read_bytes()
    store.close()


class Cut(Exception):
    """The writer's process ends here."""


def cut_at(monkeypatch, target: str, when) -> None:
    """Make zarr_tier's `target` (an os function or a ZarrStore method) raise Cut the first time
    `when(args)` holds."""
    owner = os if hasattr(os, target) else zarr_tier.ZarrStore
    real, fired = getattr(owner, target), []

    def cut(*args, **kwargs):
        if not fired and when(args):
            fired.append(True)
            raise Cut(target)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, target, cut)


# where the writer is cut off: (function, when, the row being written, rows readable after the cut);
# shard 2 holds rows 8..11
CUTS = {
    "row written, record not": ("_set_state", lambda a: a[2:] == (2, 0, 2), 9, 9),
    "shard complete, not linked": ("replace", lambda a: str(a[1]).endswith("x.log/c/2/0"), 11, 12),
    "linked, record not moved on": ("_set_state", lambda a: a[2:] == (3, 0, 0), 12, 12),
    "record moved on, no new file": ("_begin", lambda a: a[2] == 3, 12, 12),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_writer_cut_off_anywhere_leaves_its_rows_readable(tmp_path, monkeypatch, cut):
    data, path = rows(2), tmp_path / "p.zarr"
    store = new_log(path)
    target, when, row, readable = CUTS[cut]
    for i in range(row):
        store.write_rows("x.log", i, data[i : i + 1])
    cut_at(monkeypatch, target, when)
    with pytest.raises(Cut):
        store.write_rows("x.log", row, data[row : row + 1])
    monkeypatch.undo()
    published = {p: p.read_bytes() for p in (path / "x.log" / "c").glob("*/0")}
    reader = open_store("zarr", path, readonly=True)
    np.testing.assert_array_equal(reader.read_rows("x.log", 0, readable), data[:readable])
    writer = open_store("zarr", path)  # a new process: goes on from the record
    for i in range(readable, ROWS):
        writer.write_rows("x.log", i, data[i : i + 1])
    for p, raw in published.items():  # a shard in the log is replaced whole, never written in place
        assert p.read_bytes() == raw, p
    np.testing.assert_array_equal(
        open_store("zarr", path, readonly=True).read_rows("x.log", 0, ROWS), data
    )
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["x.log"][:], data)
    for s in (store, reader, writer):
        s.close()


def test_a_ring_rewrites_shards_and_jumps_back(tmp_path):
    """Rows rewritten out of order (a ring wrapping, a recovery zeroing rows) merge with the rest of
    their shard; readers and a reopened writer always see the newest rows."""
    path, data = tmp_path / "p.zarr", np.zeros((ROWS, COLS), np.float32)
    store = new_log(path)
    for k, i in enumerate(list(range(ROWS)) + list(range(5)) + [13, 2, 22, 0]):
        data[i] = rows(100 + k, 1)[0]
        store.write_rows("x.log", i, data[i : i + 1])
        np.testing.assert_array_equal(
            open_store("zarr", path, readonly=True).read_rows("x.log", 0, ROWS), data
        )
    store.close()
    writer = open_store("zarr", path)
    for i in (1, 6, 7):
        data[i] = -i
        writer.write_rows("x.log", i, data[i : i + 1])
    np.testing.assert_array_equal(
        open_store("zarr", path, readonly=True).read_rows("x.log", 0, ROWS), data
    )
    writer.close()


def test_a_log_written_through_a_url_reads_and_goes_on_from_its_directory(tmp_path):
    """A writer through a URL keeps the open rows in the side array (no writes in place); opened
    by its directory path, the store reads them there, and a writer moves them into the open
    shard's file and goes on (so does a store an older nvmlib wrote)."""
    path, data = tmp_path / "p.zarr", rows(4)
    remote = open_store("zarr", f"file://{path}", shard_bytes=SHARD)
    remote.create_log("x.log", (ROWS, COLS), "float32")
    for i in range(10):  # shards 0 and 1 complete, rows 8 and 9 open in the side array
        remote.write_rows("x.log", i, data[i : i + 1])
    remote.close()
    assert not list((path / "x.log.open").glob("shard.*"))
    np.testing.assert_array_equal(
        open_store("zarr", path, readonly=True).read_rows("x.log", 0, 10), data[:10]
    )
    local = open_store("zarr", path)
    for i in range(10, ROWS):
        local.write_rows("x.log", i, data[i : i + 1])
    np.testing.assert_array_equal(
        open_store("zarr", path, readonly=True).read_rows("x.log", 0, ROWS), data
    )
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["x.log"][:], data)
    local.close()


def plain_log(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["swag.log"][:]


@pytest.mark.parametrize("codec", [None, "delta-zstd"])
@pytest.mark.parametrize("updates", [7, 24], ids=["first-lap", "wrapped"])
def test_plain_zarr_reads_a_closed_posterior_as_nvmlib_does(tmp_path, codec, updates):
    """After close() the open shard is in the log: plain zarr reads every row nvmlib reads (raw
    rows: the kept iterates themselves; a compressed log: the records' bytes and index, which only
    nvmlib's codec decodes), and a writer reopened afterwards goes on from there."""
    path, n = tmp_path / "p.zarr", 1000  # rows of 4 KiB, shards of 3 rows, 11 slots
    thetas = np.random.default_rng(5).standard_normal((updates + 4, n)).astype(np.float32)
    store = open_store("zarr", path, shard_bytes=3 * 4096)
    post = SWAGPosterior.create(store, n, max_rank=10, checkpoint_every=3, codec=codec)
    for done, stop in (
        (0, updates),
        (updates, updates + 4),
    ):  # a second writer goes on after the first closed
        for theta in thetas[done:stop]:
            post.update(theta)
        post.close()
        for name in post.log.arrays(post.meta):
            np.testing.assert_array_equal(
                zarr.open_group(str(path), mode="r")[name][:],
                store.read_rows(name, 0, store.shape(name)[0]),
            )
        assert zarr.open_group(str(path), mode="r")["swag.log.state"][0] == -1  # no open shard
        kept = np.arange(max(0, stop - 10), stop)
        reader = SWAGPosterior.open(open_store("zarr", path, readonly=True), readonly=True)
        np.testing.assert_array_equal(reader.kept_rows(), thetas[kept])
        if codec is None:
            np.testing.assert_array_equal(
                plain_log(path)[kept % (post.capacity + 1), :n], thetas[kept]
            )
        post = SWAGPosterior.open(store)
    post.close()
    store.close()


@pytest.mark.parametrize("reopen", [False, True], ids=["same-writer", "reopened-writer"])
def test_a_ring_of_one_shard_never_writes_its_published_shard_in_place(tmp_path, reopen):
    """Once the open shard is in the log (complete, or published), the next row of that shard
    starts a new open shard: the published file's bytes do not change until it is replaced whole."""
    path, data = tmp_path / "p.zarr", rows(7)
    store = open_store("zarr", path, shard_bytes=ROWS * COLS * 4)
    store.create_log("x.log", (ROWS, COLS), "float32")
    for i in range(ROWS):  # the one shard is complete: linked into the log
        store.write_rows("x.log", i, data[i : i + 1])
    shard = path / "x.log" / "c" / "0" / "0"
    published = shard.read_bytes()
    writer = open_store("zarr", path) if reopen else store
    new = rows(8, 2)
    for i in range(2):  # the ring wraps into the same shard
        writer.write_rows("x.log", i, new[i : i + 1])
        data[i] = new[i]
        assert shard.read_bytes() == published
    np.testing.assert_array_equal(
        open_store("zarr", path, readonly=True).read_rows("x.log", 0, ROWS), data
    )
    writer.publish("x.log")
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["x.log"][:], data)
    store.close()
    writer.close()
