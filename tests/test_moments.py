"""The moments interface: each home of the float64 sums (host, torch device) equals a float64 numpy
reference, checkpoints and recovers through the journal, and reopens with either; a checkpoint
written behind training is durable after flush/close and a failed one refuses the next update."""

from __future__ import annotations

import numpy as np
import pytest

from nvmlib.backends import open_store
from nvmlib.errors import InputError, StoreError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT, MOMENTS
from nvmlib.posterior.moments import HostMoments
from nvmlib.posterior.moments_torch import TorchMoments

N, K, T = 70_000, 6, 17  # N above moments.PARALLEL_MIN: the host adds on two threads
KINDS = {"host": {}, "device": {"device": "cpu"}}
THETAS = (np.random.default_rng(5).standard_normal((T, N)) * 3 + 1).astype(np.float32)


def reference(n: int) -> tuple[np.ndarray, np.ndarray]:
    ref = THETAS[:n].astype(np.float64)
    return ref.mean(0), ref.var(0)


def check(post: SWAGPosterior, n: int) -> None:
    mean, var = reference(n)
    assert post.n_collected == n
    np.testing.assert_allclose(post.mean(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(post.variance(), var, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [HostMoments, TorchMoments])
def test_each_home_of_the_sums_equals_the_float64_reference(cls):
    m = cls(N, N + 10, "cpu") if cls is TorchMoments else cls(N, N + 10)
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
    assert not m.snapshot().any() and not m.shift.any()
    m.restore(saved)
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
