"""The moments interface: each home of the float64 sums (host, torch device, the tier) equals a
float64 numpy reference, checkpoints and recovers through the journal, and reopens with any; a
checkpoint written behind training is durable after flush/close and a failed one refuses the next
update; the moments on the tier give the host's bits on every tier and hold no n_params-sized
array in RAM."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import psutil
import pytest
from conftest import small_tmpfs
from contract import TierCase, per_tier

import nvmlib.posterior.moments_store as moments_store
import nvmlib.posterior.posterior as posterior_module
from nvmlib.backends import open_store
from nvmlib.errors import InputError, PosteriorError, StoreError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT, LIVE, MOMENTS, SAVED, SHIFT
from nvmlib.posterior.moments import HostMoments
from nvmlib.posterior.moments_store import StoreMoments
from nvmlib.posterior.moments_torch import TorchMoments

N, K, T = 70_000, 6, 17  # N above moments.PARALLEL_MIN: the host adds on two threads
KINDS = {"host": {}, "device": {"device": "cpu"}, "store": {}}


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    """Blocks of 8192 parameters for the moments on the tier: N spans several, the last short."""
    monkeypatch.setattr(moments_store, "PART", 8192)


THETAS = (np.random.default_rng(5).standard_normal((T, N)) * 3 + 1).astype(np.float32)


def reference(n: int) -> tuple[np.ndarray, np.ndarray]:
    ref = THETAS[:n].astype(np.float64)
    return ref.mean(0), ref.var(0)


def check(post: SWAGPosterior, n: int) -> None:
    mean, var = reference(n)
    assert post.n_collected == n
    np.testing.assert_allclose(post.mean(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(post.variance(), var, rtol=1e-9, atol=1e-12)


def _home(cls: type, tmp_path) -> tuple[HostMoments | TorchMoments | StoreMoments, object]:
    """A home of the sums, and a store holding checkpoint slots (and θ₀) for it."""
    store = open_store("mmap", tmp_path / "m")
    store.create(SHIFT, (N,), "float64")
    store.create(MOMENTS, (2, 2, N + 10), "float64")
    if cls is TorchMoments:
        return cls(N, N + 10, "cpu"), store
    if cls is StoreMoments:
        return cls(store, N, N + 10), store
    return cls(N, N + 10), store


@pytest.mark.parametrize("cls", [HostMoments, TorchMoments, StoreMoments])
def test_each_home_of_the_sums_equals_the_float64_reference(cls, tmp_path):
    m, store = _home(cls, tmp_path)
    m.set_shift(THETAS[0].astype(np.float64))
    for row in THETAS:
        m.add(row)
    mean, var = reference(T)
    np.testing.assert_allclose(m.mean(T), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.variance(T), var, rtol=1e-9, atol=1e-12)
    block = m.snapshot(np.empty((2, N + 10)))
    assert not block[:, N:].any()
    saved = m.saved()
    m.clear()
    assert not m.snapshot().any()
    if cls is not StoreMoments:  # on the tier θ₀ stays, for the checkpoints that refer to it
        assert not m.shift_of(0, N).any()
    m.restore(saved)
    np.testing.assert_array_equal(m.snapshot(), block)
    np.testing.assert_array_equal(m.shift_of(0, N), THETAS[0])
    for slot in (0, 1):  # into a checkpoint slot and back, with the same digest
        written = m.write_slot(store, slot, 7)
        m.clear()
        d, load = m.read_slot(store, slot, 7)
        load()
        assert d == written
        np.testing.assert_array_equal(m.snapshot(), block)
    m.close()


@pytest.mark.parametrize("reopen_with", list(KINDS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_collect_checkpoint_and_reopen_with_any_moments(kind, reopen_with, tmp_path):
    with open_store("mmap", tmp_path / "p") as store:
        post = SWAGPosterior.create(
            store, N, max_rank=K, checkpoint_every=3, moments=kind, **KINDS[kind]
        )
        for t in range(T):
            post.update(THETAS[t])
            check(post, t + 1)
        post.truncate(13)
        check(post, 13)
        for t in range(13, T):
            post.update(THETAS[t])
        assert post.n_collected == T  # the last row settles
        post._fold()  # a dead process's threads stop: the last batch and the checkpoint land
        post._journal.wait()
        store.unlock("swag.log")  # the process dies: no close, no checkpoint after 16
    with open_store("mmap", tmp_path / "p") as store:
        again = SWAGPosterior.open(store, moments=reopen_with, **KINDS[reopen_with])
        check(again, T)
        np.testing.assert_array_equal(again.kept_rows(), THETAS[T - K :])
        again.close()


def test_a_checkpoint_written_behind_is_durable_after_flush(tmp_path):
    with open_store("mmap", tmp_path / "p") as store:
        post = SWAGPosterior.create(store, N, max_rank=K, checkpoint_every=3)
        took = [post.update(THETAS[t]) for t in range(7)]
        assert took == [True, False, False, True, False, False, True]
        post.flush()
        records = store.read_rows(COMMIT, 0, 2)
        assert sorted(int(r[1]) for r in records) == [4, 7]
        newest = int(np.argmax(records[:, 0]))
        block = store.read_rows(MOMENTS, newest, newest + 1)[0]
        assert (block[0, :N] == post._moments.snapshot()[0, :N]).all()
        post.close()


class FailingMoments(StoreError):
    """What the tier raised for the moments' slot."""


def test_device_moments_need_a_device(tmp_path):
    with pytest.raises(InputError, match="pass device="):
        SWAGPosterior.create(open_store("dram"), N, max_rank=K, moments="device")
    with pytest.raises(InputError, match="not one of"):
        SWAGPosterior.create(open_store("dram"), N, max_rank=K, moments="gpu")


class StoreMomentsContract(TierCase):
    """moments="store" gives the host moments' bits on this tier, through truncate and reopen,
    and leaves no scratch array behind at close."""

    def test_the_moments_on_the_tier_equal_the_hosts(self, reopen):
        results = {}
        for kind in ("host", "store"):  # one after the other in the same place
            store = reopen()
            post = SWAGPosterior.create(
                store, N, max_rank=K, checkpoint_every=4, moments=kind, overwrite=True
            )
            assert isinstance(post._moments, StoreMoments) == (kind == "store")
            for t in range(13):
                post.update(THETAS[t])
            post.truncate(11)
            for t in range(11, T):
                post.update(THETAS[t])
            results[kind] = [post.mean(), post.variance(), post.sample(3, seed=1)]
            post.close()
            assert LIVE not in store and SAVED not in store
            if self.tier.persistent:
                store.close()
                store = reopen()
                again = SWAGPosterior.open(store, moments=kind)
                again.update(THETAS[0])
                results[kind] += [again.mean(), again.variance()]
                again.close()
            store.close()
        rows = np.concatenate([THETAS[:11], THETAS[11:T]]).astype(np.float64)
        np.testing.assert_allclose(results["store"][0], rows.mean(0), rtol=1e-12, atol=1e-12)
        for host, on_tier in zip(results["host"], results["store"], strict=True):
            np.testing.assert_array_equal(host, on_tier)


globals().update(per_tier(StoreMomentsContract))

CHILD = """
import resource, sys
import numpy as np
from nvmlib import SWAGPosterior, open_store

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

n, kind = int(sys.argv[2]), sys.argv[3]
rows = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
before = hwm()
post = SWAGPosterior.create(open_store("mmap", sys.argv[1]), n, max_rank=4, checkpoint_every=3,
                            moments=kind)
ring = post.log.rows.nbytes
for t in range(7):
    post.update(rows[t % 2])
post.flush()
post.sample(2, seed=0, out=open_store("mmap", sys.argv[1] + "-draws"))
print(hwm() - before - ring)
post.close()
"""


def test_moments_on_the_tier_take_no_n_params_arrays_in_ram(tmp_path):
    """Peak RSS of a child collecting 4 M parameters, less its staged ring: the host's moments
    (sums, θ₀, a checkpoint's copy: 40 bytes a parameter) against a few blocks on the tier."""
    n = 4_000_000
    grown = {}
    for kind in ("host", "store"):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / kind), str(n), kind],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        grown[kind] = int(done.stdout.split()[-1])
    assert grown["host"] > 32 * n, grown
    assert grown["store"] < 12 * n, grown


def test_auto_puts_the_moments_on_the_tier_when_they_do_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(posterior_module, "AUTO_STORE_FRACTION", 1e-9)
    with open_store("mmap", tmp_path / "p") as store:
        post = SWAGPosterior.create(store, N, max_rank=K)
        assert isinstance(post._moments, StoreMoments)
        post.update(THETAS[0])
        post.close()
        reader = SWAGPosterior.open(store, readonly=True)
        assert isinstance(reader._moments, HostMoments)  # a reader writes no scratch array
        reader.close()
    dram = SWAGPosterior.create(open_store("dram"), N, max_rank=K)
    assert isinstance(dram._moments, HostMoments)  # on dram the tier is RAM itself


def test_a_store_without_room_for_the_moments_refuses_the_create(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    n = 250_000  # the posterior takes 17 MB, its moments on the tier 10 MB more
    with small_tmpfs(tmp_path / "fs", 22) as fs:
        store = open_store("mmap", fs)
        kept = SWAGPosterior.create(store, n, max_rank=6)
        kept.update(np.ones(n, np.float32))
        kept.close()
        with pytest.raises(StoreError, match="moments on the tier"):
            SWAGPosterior.create(store, n, max_rank=6, moments="store", overwrite=True)
        again = SWAGPosterior.open(store)  # the refused create deleted nothing
        assert again.n_collected == 1 and (again.mean() == 1).all()
        again.close()


def test_update_from_fills_the_staged_row_as_update_records_theta(tmp_path):
    with open_store("mmap", tmp_path / "a") as a, open_store("mmap", tmp_path / "b") as b:
        given = SWAGPosterior.create(a, N, max_rank=K, checkpoint_every=3)
        filled = SWAGPosterior.create(b, N, max_rank=K, checkpoint_every=3)
        for t in range(T):
            assert given.update(THETAS[t]) == filled.update_from(
                lambda row, t=t: row.__setitem__(slice(None), THETAS[t])
            )
        with pytest.raises(InputError, match="NaN"):
            filled.update_from(lambda row: row.fill(np.nan))
        assert filled.n_collected == T  # the refused iterate was not recorded
        for name in ("mean", "variance", "kept_rows"):
            np.testing.assert_array_equal(getattr(given, name)(), getattr(filled, name)())
        given.close()
        filled.close()


def _shmem() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def test_sampling_to_a_tier_gives_back_the_staged_ring(tmp_path):
    n = 1_000_000
    thetas = np.random.default_rng(2).standard_normal((6, n)).astype(np.float32)
    with open_store("mmap", tmp_path / "p") as store:
        post = SWAGPosterior.create(store, n, max_rank=4, checkpoint_every=2)
        for theta in thetas[:4]:
            post.update(theta)
        ring, before = post.log.rows.nbytes, _shmem()
        post.sample(2, seed=0, out=open_store("mmap", tmp_path / "draws"))
        assert before - _shmem() > 0.9 * ring, (before, _shmem(), ring)
        for theta in thetas[4:]:  # the next updates take the ring back
            post.update(theta)
        rows = thetas.astype(np.float64)
        np.testing.assert_allclose(post.mean(), rows.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(post.kept_rows(), thetas[2:])
        post.close()


@pytest.mark.parametrize("codec", [None, "delta-zstd"])
def test_close_gives_back_the_memory_of_the_sums_and_the_staged_ring(codec, tmp_path):
    """A closed posterior that the caller still holds keeps none of its n_params-sized buffers:
    the host sums, θ₀, a checkpoint's copy of the sums and the staged ring (resident memory)."""
    n = 4_000_000
    thetas = np.random.default_rng(3).standard_normal((4, n)).astype(np.float32)
    with open_store("mmap", tmp_path / "p") as store:
        post = SWAGPosterior.create(store, n, max_rank=4, checkpoint_every=2, codec=codec)
        for theta in thetas:
            post.update(theta)
        _ = post.mean()
        held = post.log.rows.nbytes + 5 * 8 * n  # the ring; sums, θ₀ and their copy
        before = psutil.Process().memory_info().rss
        post.close()
        freed = before - psutil.Process().memory_info().rss
        assert freed > 0.9 * held, (freed, held)
        with pytest.raises(PosteriorError, match="closed"):
            post.mean()
