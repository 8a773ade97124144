"""Sampling over parameter blocks: draws written to a tier equal the in-memory draws of the same
seed (raw and compressed logs), the formula against a float64 reference built from the same noise,
the Draws array-like, and refusals that write nothing."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import small_tmpfs

from nvmlib import SWAG
from nvmlib.backends import open_store
from nvmlib.errors import InputError, PosteriorError, StoreError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.log import LOG
from nvmlib.posterior.sampling import BLOCK, DRAWS, Draws, Noise

N = 2 * BLOCK + 123  # three blocks, the last one short
TIERS = ["dram", "mmap", "zarr"]


def collect(
    store,
    T: int = 7,
    max_rank: int = 4,
    codec: str | None = None,
    n: int = N,
    dtype: str = "float32",
) -> tuple[SWAGPosterior, np.ndarray]:
    rng = np.random.default_rng(1)
    thetas = (1.0 + np.cumsum(rng.normal(scale=1e-2, size=(T, n)), axis=0)).astype(dtype)
    post = SWAGPosterior.create(store, n, max_rank=max_rank, codec=codec, dtype=dtype)
    for theta in thetas:
        post.update(theta)
    return post, thetas


@pytest.mark.parametrize("codec", [None, "delta-zstd"])
@pytest.mark.parametrize("tier", TIERS)
def test_draws_on_a_tier_equal_the_draws_in_memory(tier, codec, tmp_path):
    store = open_store(tier, None if tier == "dram" else tmp_path / "post")
    out = open_store(tier, None if tier == "dram" else tmp_path / "draws")
    post, _ = collect(store, codec=codec)
    held = post.sample(5, seed=3)
    draws = post.sample(5, seed=3, out=out)
    assert isinstance(draws, Draws) and draws.shape == (5, N) and len(draws) == 5
    assert draws.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(draws), held)
    np.testing.assert_array_equal(draws[-1], held[-1])
    np.testing.assert_array_equal(draws[1:4:2], held[1:4:2])
    np.testing.assert_array_equal(np.stack(list(draws)), held)
    assert sorted(out.names()) == [DRAWS, DRAWS + ".shape"]  # a compressed log's copy is gone
    again = post.sample(2, seed=4, out=out)  # replaces the draws there
    np.testing.assert_array_equal(np.asarray(again), post.sample(2, seed=4))
    if tier != "dram":  # another process reads them by name
        out.close()
        np.testing.assert_array_equal(
            np.asarray(Draws(open_store(tier, tmp_path / "draws", readonly=True))),
            post.sample(2, seed=4),
        )
    post.close()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_block_draws_match_a_float64_reference(dtype):
    """θ̄ + √scale·(σ⊙z₁ + D z₂/√(K−1)) in float64 from the same z₁ (block stream) and z₂."""
    post, thetas = collect(open_store("dram"), T=9, max_rank=5, dtype=dtype)
    S, K, scale = 4, 5, 0.7
    draws = post.sample(S, scale=scale, seed=21)
    mean = thetas.astype(np.float64).mean(0)
    var = np.maximum((thetas.astype(np.float64) ** 2).mean(0) - mean**2, 0)
    noise = Noise(21, S, K, np.float64 if dtype == "float64" else np.float32)
    z1, z2 = noise.z1(0, N).astype(np.float64), noise.z2.numpy().astype(np.float64)
    D = thetas[-K:].astype(np.float64) - mean
    ref = mean + math.sqrt(scale) * (np.sqrt(var) * z1 + z2.T @ D / math.sqrt(K - 1))
    np.testing.assert_allclose(draws, ref, rtol=0, atol=2e-6)
    post.close()


def test_z1_does_not_depend_on_how_the_vector_is_cut():
    noise = Noise(5, 3, 4, np.float32)
    whole = noise.z1(0, N)
    cuts = [0, 17, BLOCK - 1, BLOCK + 5, 2 * BLOCK, N]
    parts = np.concatenate([noise.z1(a, b) for a, b in zip(cuts, cuts[1:], strict=False)], axis=1)
    np.testing.assert_array_equal(parts, whole)
    assert not np.array_equal(whole[:, :BLOCK], whole[:, BLOCK : 2 * BLOCK])


def test_a_damaged_row_is_refused_and_leaves_no_draws(tmp_path):
    store, out = open_store("mmap", tmp_path / "post"), open_store("mmap", tmp_path / "draws")
    post, _ = collect(store)
    post.close()
    log = store.array(LOG)
    log[5 % log.shape[0], BLOCK + 1] += 1.0  # a value in the second block of a kept row
    log.flush()
    again = SWAGPosterior.open(store, readonly=True)
    with pytest.raises(PosteriorError, match="fails its checksum"):
        again.sample(3, out=out)
    assert out.names() == []
    again.close()


def test_a_store_without_room_or_a_bad_name_is_refused_before_writing(tmp_path):
    post, _ = collect(open_store("dram"))
    with pytest.raises(InputError, match="one of the posterior's own arrays"):
        post.sample(2, out=open_store("mmap", tmp_path / "x"), name=LOG)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    with small_tmpfs(tmp_path / "fs", 2) as fs:
        out = open_store("mmap", fs / "draws")
        with pytest.raises(StoreError, match="too small"):
            post.sample(30, out=out)  # 30 × 131195 float32 = 15.7 MB
        assert out.names() == []
    post.close()


def test_predict_and_sample_models_beyond_the_memory_budget_draw_on_a_scratch_store(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    swag = SWAG(model, "mmap", tmp_path / "post", max_rank=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        swag.collect()
    loader = [x[:10], x[10:]]
    held = swag.predict(loader, S=5, seed=2)
    np.testing.assert_array_equal(swag.predict(loader, S=5, seed=2, memory_budget=0), held)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["post"]  # the scratch store is gone
    drawn = swag.sample_models(3, seed=4, memory_budget=100)
    assert len([p for p in tmp_path.iterdir() if ".draws-" in p.name]) == 1
    thetas = swag.sample(3, seed=4)
    for model_s, theta in zip(drawn, thetas, strict=True):
        got = torch.nn.utils.parameters_to_vector(model_s.parameters()).detach().numpy()
        np.testing.assert_array_equal(got, theta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["post"]
    with pytest.raises(InputError, match="memory_budget=-1"):
        swag.predict(loader, S=2, memory_budget=-1)
    swag.close()
