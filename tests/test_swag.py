"""SWAGPosterior on every available tier: exact moments, the ring, sampling, reopening, bad
input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from nvmlib.backends import open_store
from nvmlib.errors import LockedError, PosteriorError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT
from nvmlib.posterior.log import LOG


def iterates(T: int, n: int, seed: int = 0) -> np.ndarray:
    """A random-walk trajectory around an offset, like SGD iterates (large mean, small spread)."""
    rng = np.random.default_rng(seed)
    return 3.0 + np.cumsum(rng.normal(scale=1e-2, size=(T, n)), axis=0)


def collect(store, thetas, **kw) -> SWAGPosterior:
    post = SWAGPosterior.create(store, thetas.shape[1], **kw)
    for t in thetas:
        post.update(t)
    return post


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_moments_match_float64_reference(store, dtype):
    th = iterates(60, 500)
    post = collect(store, th, max_rank=20, dtype=dtype, checkpoint_every=7)
    ref = th.astype(dtype).astype(np.float64)  # what the tier stores
    assert post.n_collected == 60 and post.rank == 20
    assert rel_err(post.mean(), ref.mean(0)) <= 1e-6
    assert rel_err(post.variance(), ref.var(0)) <= 1e-6
    assert (post.variance() >= 0).all()
    post.close()


def test_ring_keeps_exactly_the_last_K(store):
    th = iterates(23, 30)
    post = collect(store, th, max_rank=5, dtype="float64")
    kept = post.kept_rows()
    assert kept.shape == (5, 30)
    np.testing.assert_array_equal(kept, th[18:23])  # oldest first
    np.testing.assert_array_equal(post.iterates(20, 22), th[20:22])
    with pytest.raises(ValueError, match="not all kept"):
        post.iterates(17, 20)
    post.close()


def test_keep_all_with_capacity(store):
    th = iterates(12, 8)
    post = collect(store, th, max_rank=None, capacity=12, dtype="float64")
    assert post.rank == 12
    np.testing.assert_array_equal(np.sort(post.kept_rows(), axis=0), np.sort(th, axis=0))
    with pytest.raises(PosteriorError, match="log is full"):
        post.update(th[0])
    post.close()


def test_sample_covariance_matches_swag_covariance(store):
    """20,000 draws of an n=20, K=10 posterior: every entry of the sample covariance lies within
    5 standard errors of ½(Σ_diag + DDᵀ/(K−1)); the standard error of a Gaussian sample covariance
    entry is sqrt((C_ij² + C_ii C_jj)/N)."""
    th = iterates(30, 20, seed=3)
    post = collect(store, th, max_rank=10, dtype="float64")
    mean, var = post.mean(), post.variance()
    D = (th[-10:] - mean).T
    C = 0.5 * (np.diag(var) + D @ D.T / 9)
    N = 20_000
    draws = post.sample(N, seed=7).astype(np.float64)
    assert draws.shape == (N, 20) and post.sample(2).dtype == np.float32
    Chat = np.cov(draws, rowvar=False)
    se = np.sqrt((C**2 + np.outer(np.diag(C), np.diag(C))) / N)
    assert np.all(np.abs(Chat - C) <= 5 * se)
    assert np.all(np.abs(draws.mean(0) - mean) <= 5 * np.sqrt(np.diag(C) / N) + 1e-6)
    post.close()


def test_sample_is_one_pass_and_seeded(store):
    post = collect(store, iterates(15, 40), max_rank=8)
    a, b = post.sample(4, seed=11), post.sample(4, seed=11)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, post.sample(4, seed=12))
    # scale=0 gives the mean exactly
    np.testing.assert_allclose(post.sample(3, scale=0.0)[0], post.mean().astype(np.float32))
    post.close()


def test_torch_tensor_input(store):
    th = iterates(5, 10)
    post = SWAGPosterior.create(store, 10, max_rank=4, dtype="float64")
    for t in th:
        post.update(torch.from_numpy(t).requires_grad_(True))
    np.testing.assert_allclose(post.mean(), th.mean(0), rtol=1e-12)
    post.close()


def test_reopen_in_same_process_and_nbytes(store):
    th = iterates(17, 50)
    post = collect(store, th, max_rank=6, checkpoint_every=4)
    m, v, s = post.mean(), post.variance(), post.sample(3, seed=1)
    assert post.nbytes >= 6 * 50 * 4
    post.close()
    again = SWAGPosterior.open(store, n_params=50)
    assert again.n_collected == 17 and again.rank == 6
    np.testing.assert_array_equal(again.mean(), m)
    np.testing.assert_array_equal(again.variance(), v)
    np.testing.assert_array_equal(again.sample(3, seed=1), s)
    again.update(th[0])  # it keeps collecting
    assert again.n_collected == 18
    again.close()


def test_reopen_in_new_process(tmp_path):
    th = iterates(40, 300)
    store = open_store("mmap", tmp_path)
    post = collect(store, th, max_rank=16, checkpoint_every=6)
    m, v, s = post.mean(), post.variance(), post.sample(5, seed=42)
    post.close()
    store.close()
    code = (
        "import sys, numpy as np\n"
        "from nvmlib import open_store, SWAGPosterior\n"
        f"p = SWAGPosterior.open(open_store('mmap', {str(tmp_path)!r}), readonly=True)\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, np.concatenate([p.mean(), p.variance(), "
        "p.sample(5, seed=42).ravel().astype(np.float64)]))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(out[:300], m)
    np.testing.assert_array_equal(out[300:600], v)
    np.testing.assert_array_equal(out[600:].astype(np.float32), s.ravel())


def test_truncate_rolls_back_exactly(store):
    th = iterates(30, 25)
    post = SWAGPosterior.create(store, 25, max_rank=20, dtype="float64", checkpoint_every=5)
    marks = [i + 1 for i, t in enumerate(th) if post.update(t)]
    assert marks[:3] == [1, 6, 11]
    post.truncate(25)
    assert post.n_collected == 25
    np.testing.assert_allclose(post.mean(), th[:25].mean(0), rtol=1e-13)
    np.testing.assert_allclose(post.variance(), th[:25].var(0), rtol=1e-9)
    post.close()


# ---- bad input: each refused with a clear message, the stored posterior intact --------------
def test_bad_theta_is_refused_and_posterior_unchanged(store):
    th = iterates(6, 12)
    post = collect(store, th, max_rank=4, dtype="float64")
    before = (post.n_collected, post.mean().copy(), post.variance().copy(), post.kept_rows())
    bad_inputs = [
        (th[0][:-1], ValueError, "shape .* 12 parameters"),
        (th[:2], ValueError, "shape"),
        (th[0].reshape(3, 4), ValueError, "1-D vector"),
        (np.arange(12), TypeError, "integer|floating point"),
        (np.where(np.arange(12) == 5, np.nan, th[0]), ValueError, "NaN/Inf .* index 5"),
        (np.where(np.arange(12) == 2, np.inf, th[0]), ValueError, "NaN/Inf"),
    ]
    for value, exc, msg in bad_inputs:
        with pytest.raises(exc, match=msg):
            post.update(value)
    assert post.n_collected == before[0]
    np.testing.assert_array_equal(post.mean(), before[1])
    np.testing.assert_array_equal(post.variance(), before[2])
    np.testing.assert_array_equal(post.kept_rows(), before[3])
    post.close()


def test_float16_overflow_refused(store):
    post = SWAGPosterior.create(store, 3, max_rank=2, dtype="float16")
    with pytest.raises(ValueError, match="overflows float16"):
        post.update(np.array([1e6, 0.0, 1.0]))
    assert post.n_collected == 0
    post.close()


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"max_rank": 1}, "max_rank=1"),
        ({"max_rank": 0}, "max_rank=0"),
        ({"max_rank": None}, "capacity"),
        ({"max_rank": 4, "dtype": "int32"}, "dtype"),
    ],
)
def test_bad_create_arguments(store, kw, msg):
    with pytest.raises(ValueError, match=msg):
        SWAGPosterior.create(store, 10, **kw)


def test_open_where_there_is_no_posterior(tmp_path):
    with pytest.raises(PosteriorError, match="holds no posterior"):
        SWAGPosterior.open(open_store("mmap", tmp_path / "empty"))


def test_open_for_a_different_model(store):
    collect(store, iterates(3, 10), max_rank=2, model="model_2fc").close()
    with pytest.raises(PosteriorError, match="made for 10 parameters, not 11"):
        SWAGPosterior.open(store, n_params=11)
    with pytest.raises(PosteriorError, match="model 'model_2fc', not 'model_4fc'"):
        SWAGPosterior.open(store, model="model_4fc")
    assert SWAGPosterior.open(store, n_params=10, model="model_2fc", readonly=True).n_collected == 3


def test_create_over_existing_posterior_needs_overwrite(store):
    collect(store, iterates(3, 10), max_rank=2).close()
    with pytest.raises(PosteriorError, match="already holds a posterior"):
        SWAGPosterior.create(store, 10, max_rank=2)
    assert SWAGPosterior.open(store, readonly=True).n_collected == 3
    SWAGPosterior.create(store, 10, max_rank=3, overwrite=True).close()


def test_second_writer_is_locked_out(store):
    post = collect(store, iterates(3, 10), max_rank=2)
    assert post.n_collected == 3  # the last row was in flight: now it is written and counted
    with pytest.raises(LockedError, match="read-only"):
        SWAGPosterior.open(store)
    reader = SWAGPosterior.open(store, readonly=True)
    assert reader.n_collected == 3
    with pytest.raises(PosteriorError, match="read-only"):
        reader.update(np.zeros(10))
    post.close()
    SWAGPosterior.open(store).close()


def test_second_writer_in_another_process(tmp_path):
    post = collect(open_store("mmap", tmp_path), iterates(3, 10), max_rank=2)
    code = (
        "from nvmlib import open_store, SWAGPosterior\n"
        f"SWAGPosterior.open(open_store('mmap', {str(tmp_path)!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "being written by another process" in run.stderr
    post.close()


def test_too_small_tier_is_refused_before_writing(tmp_path):
    store = open_store("mmap", tmp_path)
    free = store.free_bytes()
    n = 1_000_000
    rows = free // (n * 4) + 10
    with pytest.raises(Exception, match="too small.*GB"):
        SWAGPosterior.create(store, n, max_rank=rows)
    assert LOG not in store and COMMIT not in store


def test_unwritable_path(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.geteuid() == 0:
            target = "/proc/nvmlib-posterior"  # root may write anywhere on disk, not under /proc
        else:
            target = str(ro / "posterior")
        with pytest.raises(Exception, match="cannot create|not writable"):
            open_store("mmap", target)
    finally:
        ro.chmod(0o700)
