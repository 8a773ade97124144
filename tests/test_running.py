"""deviations="running": D's rows centred on the running mean at each row's collection (as
swa_gaussian and torch-uncertainty do), in the same single pass at sampling time: D against a
float64 reference of the running means and against swa_gaussian's update, the draws against the
formula from the same noise, on raw and compressed logs and a wrapped ring, the same draws through a
sharded posterior and a dask cluster, and a bad value refused before anything is written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nvmlib import SWAG
from nvmlib.backends import open_store
from nvmlib.errors import InputError
from nvmlib.nn.sharded import ShardedPosterior
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.sampling import BLOCK, Noise, coefficients

N = 2 * BLOCK + 123  # three blocks, the last one short
EPS32 = float(np.finfo(np.float32).eps)


def iterates(T: int, n: int = N, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1.0 + np.cumsum(rng.normal(scale=1e-2, size=(T, n)), axis=0)).astype(np.float32)


def collect(store, thetas, max_rank, codec=None, deviations="running") -> SWAGPosterior:
    post = SWAGPosterior.create(
        store, thetas.shape[1], max_rank=max_rank, codec=codec, deviations=deviations
    )
    for theta in thetas:
        post.update(theta)
    return post


def running_reference(thetas: np.ndarray, K: int) -> np.ndarray:
    """θ_k − mean(θ_0..θ_k) for the last K iterates, in float64 from the iterates themselves."""
    t = thetas.astype(np.float64)
    n = len(t)
    return np.stack([t[k] - t[: k + 1].mean(0) for k in range(n - K, n)])


def swa_gaussian_reference(thetas: np.ndarray, max_num_models: int) -> np.ndarray:
    """cov_mat_sqrt after SWAG.collect_model on each iterate, as in swag/posteriors/swag.py of
    github.com/wjmaddox/swa_gaussian (float32, as its buffers): the mean is updated first, then the
    deviation from that running mean is appended and the oldest row dropped past max_num_models."""
    mean = np.zeros(thetas.shape[1], np.float32)
    cov_mat_sqrt = np.zeros((0, thetas.shape[1]), np.float32)
    for n_models, theta in enumerate(thetas):
        mean = mean * np.float32(n_models / (n_models + 1.0)) + theta / np.float32(n_models + 1.0)
        dev = (theta - mean).reshape(1, -1)
        cov_mat_sqrt = np.concatenate([cov_mat_sqrt, dev], axis=0)
        if n_models + 1 > max_num_models:
            cov_mat_sqrt = cov_mat_sqrt[1:, :]
    return cov_mat_sqrt


CASES = [  # (updates, max_rank, codec): unwrapped, a wrapped ring, compressed (wrapped, not)
    (4, 4, None),
    (11, 4, None),
    (11, 4, "delta-zstd"),
    (5, 8, "delta-zstd"),
]


@pytest.mark.parametrize("T,K,codec", CASES)
def test_d_is_centred_on_the_running_means(T, K, codec):
    thetas = iterates(T)
    post = collect(open_store("dram"), thetas, K, codec)
    rank = min(T, K)
    ref = running_reference(thetas, rank)
    np.testing.assert_allclose(post.deviation_rows(), ref, rtol=0, atol=1e-12)
    # the sampling kernel with the running coefficients of the identity gives D's rows too
    eye = torch.eye(rank, dtype=torch.float64)
    rows = post.low_rank(coefficients(eye, T, "running"), post.mean()).numpy()
    np.testing.assert_allclose(rows, ref, rtol=0, atol=1e-12)
    post.close()


def test_final_is_the_default_and_centres_on_the_final_mean():
    thetas = iterates(9)
    post = collect(open_store("dram"), thetas, 4, deviations="final")
    assert post.deviations == "final" and post.meta["deviations"] == "final"
    mean = thetas.astype(np.float64).mean(0)
    np.testing.assert_allclose(post.deviation_rows(), thetas[-4:] - mean, rtol=0, atol=1e-12)
    default = SWAGPosterior.create(open_store("dram"), N, max_rank=4)
    assert default.deviations == "final"
    post.close()
    default.close()


def test_the_mean_term_is_the_sum_of_the_coefficients():
    """Σ_k z₂ₖ(θ_k − θ̄_k) = Σⱼ cⱼθⱼ − bθ̄ with b = Σ_k z₂ₖ·n/(k+1): b equals Σⱼ cⱼ, so the kernel's
    Σⱼ cⱼ(θⱼ − θ̄) needs no separate mean term."""
    z2 = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 3)))
    for count in (5, 12):
        c = coefficients(z2, count, "running").numpy()
        k = np.arange(count - 5, count)
        b = (z2.numpy() * (count / (k + 1.0))[:, None]).sum(0)
        np.testing.assert_allclose(c.sum(0), b, rtol=1e-13)
    assert coefficients(z2, 5, "final") is z2


@pytest.mark.parametrize("T,K", [(7, 7), (30, 20)])
def test_d_equals_swa_gaussian_to_float32_rounding(T, K):
    thetas = iterates(T, n=5000, seed=3)
    post = collect(open_store("dram"), thetas, K)
    theirs = swa_gaussian_reference(thetas, K)
    assert theirs.shape == (min(T, K), 5000)
    ours = post.deviation_rows()
    # their float32 running mean carries about one rounding of |θ| per update
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=T * EPS32 * np.abs(thetas).max())
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()
    post.close()


@pytest.mark.parametrize("T,K,codec", CASES)
def test_running_draws_match_the_formula_from_the_same_noise(T, K, codec, tmp_path):
    """θ̄ + √scale·(σ⊙z₁ + D_running z₂/√(K−1)) in float64 from the same z₁ (block stream) and z₂;
    written to a tier they equal the in-memory draws."""
    thetas = iterates(T)
    post = collect(open_store("mmap", tmp_path / "post"), thetas, K, codec)
    S, scale, rank = 4, 0.7, min(T, K)
    draws = post.sample(S, scale=scale, seed=21)
    t64 = thetas.astype(np.float64)
    mean = t64.mean(0)
    var = np.maximum((t64**2).mean(0) - mean**2, 0)
    noise = Noise(21, S, rank, np.float32)
    z1, z2 = noise.z1(0, N).astype(np.float64), noise.z2.numpy().astype(np.float64)
    D = running_reference(thetas, rank)
    ref = mean + math.sqrt(scale) * (np.sqrt(var) * z1 + z2.T @ D / math.sqrt(rank - 1))
    np.testing.assert_allclose(draws, ref, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(post.sample(S, scale=scale, seed=21), draws)  # deterministic
    on_tier = post.sample(S, scale=scale, seed=21, out=open_store("mmap", tmp_path / "draws"))
    np.testing.assert_array_equal(np.asarray(on_tier), draws)
    post.close()


def test_running_differs_from_final_and_survives_reopening(tmp_path):
    thetas = iterates(11)
    store = open_store("mmap", tmp_path / "post")
    post = collect(store, thetas, 4)
    draws = post.sample(3, seed=5)
    post.close()
    again = SWAGPosterior.open(store, readonly=True)
    assert again.deviations == "running"
    np.testing.assert_array_equal(again.sample(3, seed=5), draws)
    other = collect(open_store("dram"), thetas, 4, deviations="final")
    assert np.abs(other.sample(3, seed=5) - draws).max() > 1e-4
    again.close()
    other.close()


def test_a_sharded_posterior_draws_the_same(tmp_path):
    """Two 'ranks' each holding part of the vector, read as one: the same running draws."""
    thetas = iterates(11)
    half = BLOCK + 77
    whole = collect(open_store("dram"), thetas, 4)
    posts = [
        collect(open_store("dram"), np.ascontiguousarray(thetas[:, :half]), 4),
        collect(open_store("dram"), np.ascontiguousarray(thetas[:, half:]), 4),
    ]
    sharded = ShardedPosterior(posts, [(0, 0, 0, half), (1, 0, half, N - half)], N)
    np.testing.assert_allclose(
        sharded.sample(4, seed=9), whole.sample(4, seed=9), rtol=0, atol=1e-6
    )
    sharded.close()
    whole.close()


def test_a_dask_cluster_draws_the_same(tmp_path):
    pytest.importorskip("dask.distributed")
    from nvmlib import dask as nvd

    thetas = iterates(11, n=3000)
    store = open_store("zarr", tmp_path / "p.zarr", shard_bytes=3 * 3000 * 4)
    post = collect(store, thetas, 4)
    local = post.sample(4, seed=2)
    cluster, client = nvd.local_cluster(1)
    try:
        remote = post.sample(4, seed=2, executor=nvd.DaskExecutor(client))
    finally:
        client.close()
        cluster.close()
    np.testing.assert_allclose(remote, local, rtol=0, atol=1e-6)
    post.close()
    store.close()


@pytest.mark.parametrize("bad", ["Running", "mean", None, 1])
def test_a_bad_deviations_is_refused_before_anything_is_written(bad, tmp_path):
    store = open_store("mmap", tmp_path / "post")
    with pytest.raises(InputError, match="deviations=.* is not one of final, running"):
        SWAGPosterior.create(store, 10, max_rank=4, deviations=bad)
    assert store.names() == []
    where = tmp_path / "swag"
    with pytest.raises(InputError, match="deviations="):
        SWAG(nn.Linear(3, 2), "mmap", where, max_rank=4, deviations=bad)
    assert not where.exists()


def test_swag_passes_deviations_through(tmp_path):
    model = nn.Linear(3, 2)
    swag = SWAG(model, "mmap", tmp_path / "swag", max_rank=4, deviations="running")
    thetas = []
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        thetas.append(torch.cat([p.detach().flatten() for p in model.parameters()]).numpy())
        swag.collect()
    post = swag.posterior
    assert post.deviations == "running"
    np.testing.assert_allclose(
        post.deviation_rows(), running_reference(np.stack(thetas), 4), rtol=0, atol=1e-7
    )
    swag.close()
