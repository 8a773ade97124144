"""Damaged, tampered, mixed or truncated posterior files: each recovered exactly or refused with an
error naming what is damaged (issue 10, defects 1, 3, 5, 6, 8 and the checksummed format)."""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys

import numpy as np
import pytest
from contract import TierCase, per_tier
from test_swag import iterates

from nvmlib.backends import open_store
from nvmlib.errors import InputError, LockedError, PosteriorError, StoreError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT, COUNT, FORMAT, META, MOMENTS, SHIFT
from nvmlib.posterior.log import LOG

N = 40


def collected(store, T: int = 13, seed: int = 0, **kw) -> np.ndarray:
    """Collect T iterates (K=8, checkpoint every 4) on `store`, close, and return them."""
    th = iterates(T, N, seed)
    post = SWAGPosterior.create(
        store,
        N,
        max_rank=kw.pop("max_rank", 8),
        dtype="float64",
        checkpoint_every=kw.pop("checkpoint_every", 4),
        **kw,
    )
    for t in th:
        post.update(t)
    post.close()
    return th


def assert_exact(post: SWAGPosterior, th: np.ndarray) -> None:
    n = post.n_collected
    np.testing.assert_allclose(post.mean(), th[:n].mean(0), rtol=1e-12)
    np.testing.assert_allclose(post.variance(), th[:n].var(0), rtol=1e-7, atol=1e-12)
    np.testing.assert_array_equal(post.kept_rows(), th[max(0, n - post.capacity) : n])


def tamper(store, name: str, row: int, fn) -> None:
    block = store.read_rows(name, row, row + 1)
    fn(block)
    store.write_rows(name, row, block)
    store.persist(name)


# ---- defect 3: tampering and damage -----------------------------------------------------------


def test_truncated_log_file_is_refused_not_regrown(tmp_path):
    store = open_store("mmap", tmp_path)
    collected(store)
    store.close()
    log = tmp_path / f"{LOG}.npy"
    size = log.stat().st_size
    with open(log, "r+b") as f:
        f.truncate(size - 4096)
    for readonly in (True, False):
        with pytest.raises(StoreError, match="truncated"):
            SWAGPosterior.open(open_store("mmap", tmp_path, readonly=readonly), readonly=readonly)
    assert log.stat().st_size == size - 4096, "a read-write open grew the damaged file back"


def test_old_format_is_refused_with_a_clear_error(tmp_path):
    store = open_store("mmap", tmp_path)
    collected(store)
    old = np.frombuffer(json.dumps({"format": 2, "n_params": N}).encode(), np.uint8)
    store.delete(META)
    store.create(META, old.shape, "uint8")
    store.write_rows(META, 0, old)
    with pytest.raises(
        PosteriorError, match=f"format 2, written by an older nvmlib.*format {FORMAT}"
    ):
        SWAGPosterior.open(store, readonly=True)


def test_zero_filled_meta_of_an_interrupted_create(tmp_path):
    store = open_store("mmap", tmp_path)
    collected(store)
    store.write_rows(META, 0, np.zeros(store.shape(META), np.uint8))
    with pytest.raises(PosteriorError, match="incomplete posterior: its creation was interrupted"):
        SWAGPosterior.open(store, readonly=True)
    SWAGPosterior.create(store, N, max_rank=4).close()  # no --overwrite needed: nothing was there
    assert SWAGPosterior.open(store, readonly=True).n_collected == 0


# ---- defect 1: a failed train-state save must not cost the resume point ----------------------


# ---- defect 8: truncate to 0 or 1, and a fractional count -------------------------------------


def test_truncate_in_a_wrapped_ring_refuses_the_dropped_rows():
    store = open_store("dram")
    th = iterates(30, N)
    post = SWAGPosterior.create(store, N, max_rank=8, dtype="float64", checkpoint_every=4)
    for t in th[:25]:
        post.update(t)
    post.truncate(21)  # iterates 21..24 took the slots of 13..16
    np.testing.assert_allclose(post.mean(), th[:21].mean(0), rtol=1e-12)
    with pytest.raises(PosteriorError, match="iterate 13 .* dropped by truncate"):
        post.kept_rows()
    for t in th[21:30]:
        post.update(t)
    assert_exact(post, th)
    post.close()


# ---- defect 5: closing the store keeps the lock of an open posterior --------------------------
def test_store_close_keeps_the_writer_lock(tmp_path):
    store = open_store("mmap", tmp_path)
    post = SWAGPosterior.create(store, N, max_rank=4)
    store.close()
    code = (
        "from nvmlib import open_store, SWAGPosterior\n"
        f"SWAGPosterior.open(open_store('mmap', {str(tmp_path)!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "being written by another process" in run.stderr
    post.update(np.ones(N))
    post.close()
    with pytest.raises(LockedError):  # in-process: still one writer at a time
        store.lock(LOG)
        store.lock(LOG)
    store.unlock(LOG)


# ---- defect 6: --overwrite checks before it deletes -------------------------------------------
def test_overwrite_refused_by_the_file_size_limit_keeps_the_old_posterior(tmp_path):
    store = open_store("mmap", tmp_path)
    th = collected(store)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(StoreError, match="ulimit -f.*Nothing was changed"):
            SWAGPosterior.create(store, 100_000, max_rank=50, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    post = SWAGPosterior.open(store, readonly=True)
    assert post.n_collected == 13
    assert_exact(post, th)


# ---- defect 1 (the cause named), defect 9 (read-only mounts): on a real small or read-only mount
@pytest.fixture
def mount(tmp_path):
    """A 2 MB tmpfs (root only), remountable read-only: mount(ro=True)."""
    where = tmp_path / "mnt"
    where.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def test_train_state_on_a_full_disk_names_the_cause_and_keeps_the_old_one(mount):
    from nvmlib.backends.files import write_atomically

    state = mount / "train_state.pt"
    write_atomically(state, b"old state")
    with pytest.raises(StoreError, match="disk is full.*previous train_state.pt is intact"):
        write_atomically(state, bytes(4 << 20))
    assert state.read_bytes() == b"old state" and [p.name for p in mount.iterdir()] == [
        "train_state.pt"
    ]


# ---- defect 10: a devdax table entry outside the device -----------------------------------------
def test_devdax_entry_with_a_negative_offset_is_refused(tmp_path):
    """The table is rewritten with a valid checksum but an extent at offset −4096: the open must be
    a clear StoreError (run in a child, as today's main segfaults)."""
    pytest.importorskip("nvmlib.backends.libpmem").lib()
    from nvmlib.backends.pmem import DeviceLayout, Extent

    dev = tmp_path / "dax0.0"
    with dev.open("wb") as f:
        f.truncate(8 << 20)
    store = open_store("pmem", dev, device=True)
    collected(store)
    layout: DeviceLayout = store._layout
    table = dict(layout.table)
    e = table[LOG]
    table[LOG] = Extent(-4096, e.shape, e.dtype)
    layout._write(table)
    code = (
        "from nvmlib import open_store, SWAGPosterior\n"
        f"SWAGPosterior.open(open_store('pmem', {str(dev)!r}, device=True, readonly=True), "
        "readonly=True)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (
        run.returncode == 1
        and "StoreError" in run.stderr
        and "invalid entry for 'swag.log'" in run.stderr
    ), run.stderr


class IntegrityContract(TierCase):
    """Damaged, tampered or truncated posteriors on a tier: recovered exactly or refused."""

    def test_count_plus_three_is_recovered_exactly(self, reopen):
        self.require("persistent")
        with reopen() as store:
            th = collected(store)
            raw = store.read_rows(COUNT, 0, 2)
            raw[0] += 3
            store.write_rows(COUNT, 0, raw)
            store.persist(COUNT)
            post = SWAGPosterior.open(store)
            assert post.n_collected == 13
            assert_exact(post, th)
            post.close()
            assert (
                SWAGPosterior.open(store, readonly=True).n_collected == 13
            )  # close() saved nothing wrong

    def test_a_torn_count_keeps_every_row_that_verifies(self, reopen):
        """A crash that tears the count's write (16 bytes: a pmem copy is failure-atomic in 8) and
        the newest checkpoint: the rows written after the checkpoint left still verify, and all
        of them are recovered, not only the checkpoint's updates."""
        self.require("persistent")
        with reopen() as store:
            th = collected(store)  # checkpoints of 9 and 13 updates
            records = store.read_rows(COMMIT, 0, 2)
            store.write_rows(COMMIT, int(np.argmax(records[:, 1])), np.zeros((1, 6), np.int64))
            raw = store.read_rows(COUNT, 0, 2)
            raw[1] ^= 1  # the count written, its digest not yet
            store.write_rows(COUNT, 0, raw)
            for name in (COMMIT, COUNT):
                store.persist(name)
            assert SWAGPosterior.open(store, readonly=True).n_collected == 13
            post = SWAGPosterior.open(store)
            assert post.n_collected == 13
            assert_exact(post, th)
            post.update(th[0])
            post.close()
            assert SWAGPosterior.open(store, readonly=True).n_collected == 14

    @pytest.mark.parametrize("field", ["n_params", "capacity"])
    def test_edited_meta_is_refused(self, reopen, field):
        self.require("persistent")
        with reopen() as store:
            collected(store)
            raw = store.read_rows(META, 0, store.shape(META)[0]).tobytes()
            edited = raw.replace(
                f'"{field}": '.encode(), f'"{field}": 1'.encode(), 1
            )  # 40 -> 140, 8 -> 18
            store.write_rows(META, 0, np.frombuffer(edited[: len(raw)], np.uint8))
            store.persist(META)
            with pytest.raises(PosteriorError, match="swag.meta .* fails its checksum"):
                SWAGPosterior.open(store, readonly=True)

    def test_edited_shift_is_refused(self, reopen):
        self.require("persistent")
        with reopen() as store:
            collected(store)
            tamper(store, SHIFT, 3, lambda b: b.__setitem__(0, b[0] + 1.0))
            with pytest.raises(PosteriorError, match="swag.shift fails its checksum"):
                SWAGPosterior.open(store, readonly=True)

    def test_flipped_bit_in_a_kept_row_is_refused_on_read(self, reopen):
        self.require("persistent")
        with reopen() as store:
            th = collected(store)
            slot = 10 % 9  # iterate 10 of a ring of 8 kept (+1 spare) slots
            tamper(
                store,
                LOG,
                slot,
                lambda b: b.view(np.uint8).__setitem__((0, 17), b.view(np.uint8)[0, 17] ^ 4),
            )
            post = SWAGPosterior.open(store, readonly=True)
            assert_exact_moments = np.testing.assert_allclose
            assert_exact_moments(post.mean(), th.mean(0), rtol=1e-12)  # the moments are intact
            for read in (
                post.kept_rows,
                lambda: post.sample(2, seed=0),
                lambda: post.iterates(10, 11),
            ):
                with pytest.raises(PosteriorError, match="iterate 10 .* fails its checksum"):
                    read()
            np.testing.assert_array_equal(post.iterates(11, 13), th[11:13])

    def test_moments_and_commit_of_another_posterior_are_refused(self, reopen, tmp_path):
        self.require("persistent")
        other = open_store("mmap", tmp_path / "other")
        collected(other, seed=1)
        with reopen() as store:
            collected(store)
            for name in (MOMENTS, COMMIT):
                store.write_rows(name, 0, other.read_rows(name, 0, 2))
                store.persist(name)
            with pytest.raises(PosteriorError, match="belongs to another posterior"):
                SWAGPosterior.open(store, readonly=True)

    def test_close_after_a_checkpoint_keeps_the_previous_one(self, reopen):
        self.require("persistent")
        th = iterates(9, N)
        with reopen() as store:
            post = SWAGPosterior.create(store, N, max_rank=8, dtype="float64", checkpoint_every=4)
            marks = [i + 1 for i, t in enumerate(th) if post.update(t)]
            assert marks == [1, 5, 9]
            post.close()  # what train's error path does when saving the state of update 9 fails
            post = SWAGPosterior.open(store)
            post.truncate(5)  # --resume from the last saved state
            assert post.n_collected == 5
            assert_exact(post, th)
            post.close()

    def test_a_posterior_has_one_layout_on_every_tier(self, store, tmp_path):
        """Log rows and moments are padded alike wherever the posterior lies (not per tier), so the
        arrays of one posterior fit another's (the test above copies them from the mmap tier)."""
        shapes = []
        for st in (open_store("mmap", tmp_path / "reference"), store):
            SWAGPosterior.create(st, N, max_rank=4, dtype="float64").close()
            shapes.append({name: st.shape(name) for name in st.names()})
        assert shapes[1] == shapes[0]

    @pytest.mark.parametrize("to", [0, 1, 2])
    def test_truncate_to_the_start(self, store, to):
        th = iterates(20, N)
        post = SWAGPosterior.create(store, N, max_rank=12, dtype="float64", checkpoint_every=3)
        for t in th[:10]:
            post.update(t)
        post.truncate(to)
        assert post.n_collected == to
        if to:
            assert_exact(post, th[:to])
        for t in th[to:15]:
            post.update(t)
        assert_exact(post, th[:15])
        post.close()
        again = SWAGPosterior.open(store)
        assert again.n_collected == 15
        assert_exact(again, th[:15])
        again.close()

    @pytest.mark.parametrize("bad", [1.5, "3", True, -1, 99])
    def test_truncate_refuses_a_bad_count(self, store, bad):
        post = SWAGPosterior.create(store, N, max_rank=4)
        for t in iterates(5, N):
            post.update(t)
        with pytest.raises(InputError, match="truncate"):
            post.truncate(bad)
        assert post.n_collected == 5
        post.close()

    def test_readonly_open_on_a_readonly_mount(self, mount):
        self.require("readonly_mount")
        with self.tier.open(mount) as store:
            th = collected(store, T=5, max_rank=3, checkpoint_every=1)
        del store
        # the writer's mappings: a mount with a file mapped for writing cannot become read-only
        gc.collect()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with self.tier.open(mount, readonly=True) as store:
            post = SWAGPosterior.open(store, readonly=True)
            assert_exact(post, th)
            post.close()
            with pytest.raises((StoreError, PosteriorError), match="read-only|Read-only"):
                SWAGPosterior.open(store)


globals().update(per_tier(IntegrityContract))
