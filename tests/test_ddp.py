"""nvmlib under torch.distributed: real gloo processes on loopback (torchrun, 2 CPU ranks) running
plain DDP with nvmlib.SWAG, FSDP2 (fully_shard) with nvmlib.SWAG, and Lightning under
strategy="ddp" and ModelParallelStrategy (fully_shard) (tests/distributed_worker.py); the
results are checked here, in one process."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

from nvmlib import SWAG, SWAGPosterior, open_store  # noqa: E402
from nvmlib.errors import ConfigError, PosteriorError  # noqa: E402
from nvmlib.nn.sharded import ShardedPosterior, rank_dir  # noqa: E402
from nvmlib.posterior.sampling import Noise  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from distributed_worker import STEPS, Tiny, make_model  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(HERE / "distributed_worker.py"),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def result(runs: Path, run: str, rank: int) -> dict[str, np.ndarray]:
    return dict(np.load(runs / f"{run}-rank{rank}.npz"))


def test_ddp_rank_zero_writes_the_replicated_parameters(runs):
    r0, r1 = result(runs, "ddp", 0), result(runs, "ddp", 1)
    assert r0["records"] and not r1["records"]
    error = str(r1["error"])
    assert (
        "rank 1 records nothing" in error and "SWAG.open(model, tier, path, readonly=True)" in error
    )
    assert int(r0["n_collected"]) == int(r1["n_collected"]) == STEPS
    np.testing.assert_array_equal(
        r0["ref"], r1["ref"]
    )  # replicated: the same iterates on both ranks
    np.testing.assert_allclose(r0["mean"], r0["ref"].mean(0), rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in (runs / "ddp").iterdir() if not p.name.startswith(".")) == sorted(
        f"swag.{n}.npy" for n in ("commit", "count", "log", "meta", "moments", "shift")
    )  # one posterior
    swag = SWAG.open(make_model(), "mmap", runs / "ddp", readonly=True)
    np.testing.assert_allclose(swag.posterior.kept_rows(), r0["ref"], rtol=1e-6, atol=1e-7)
    swag.close()


def test_lightning_ddp_collects_by_the_rule(runs):
    r0, r1 = result(runs, "lightning", 0), result(runs, "lightning", 1)
    assert r0["records"] and not r1["records"]
    per_epoch = 24 // 4 // 2  # the DistributedSampler gives each rank half the batches
    assert len(r0["ref"]) == 3 * per_epoch
    ref = np.array(
        [v for s, v in enumerate(r0["ref"], 1) if s % 2 == 0 and (s - 1) // per_epoch >= 1]
    )
    assert int(r0["n_collected"]) == int(r1["n_collected"]) == len(ref) == 3
    np.testing.assert_allclose(r0["mean"], ref.mean(0), rtol=1e-6, atol=1e-7)


def test_lightning_fsdp_rank_logs_open_as_the_full_posterior(runs):
    r0, r1 = result(runs, "lightning-fsdp", 0), result(runs, "lightning-fsdp", 1)
    assert r0["records"] and r1["records"]  # each rank records its shards
    np.testing.assert_array_equal(r0["ref"], r1["ref"])
    per_epoch = 24 // 4 // 2
    ref = np.array(
        [v for s, v in enumerate(r0["ref"], 1) if s % 2 == 0 and (s - 1) // per_epoch >= 1]
    )
    assert int(r0["n_collected"]) == int(r1["n_collected"]) == len(ref) == 3
    with SWAG.open(
        Tiny(shard=False), "mmap", runs / "lightning-fsdp", readonly=True
    ) as swag:  # its names
        assert swag.n_collected == 3
        np.testing.assert_allclose(swag.posterior.mean(), ref.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(swag.posterior.kept_rows(), ref.astype(np.float32))


@pytest.fixture
def sharded(runs):
    swag = SWAG.open(make_model(), "mmap", runs / "fsdp", readonly=True)
    yield swag
    swag.close()


def test_fsdp_rank_logs_open_as_the_full_posterior(runs, sharded):
    ref = result(runs, "fsdp", 0)["ref"]  # full vectors, gathered after each step
    np.testing.assert_array_equal(ref, result(runs, "fsdp", 1)["ref"])
    assert all(int(result(runs, "fsdp", r)["n_collected"]) == STEPS for r in (0, 1))
    post = sharded.posterior
    assert (
        isinstance(post, ShardedPosterior)
        and post.n_params == ref.shape[1]
        and sharded.n_collected == STEPS
    )
    np.testing.assert_allclose(post.mean(), ref.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(post.variance(), ref.var(0), rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(
        post.kept_rows(), ref[-4:].astype(np.float32)
    )  # the ring's last 4


def single(ref: np.ndarray) -> SWAG:
    """A one-process posterior of the same iterates."""
    model = make_model()
    swag = SWAG(model, "dram", max_rank=4)
    for theta in ref:
        nn.utils.vector_to_parameters(torch.from_numpy(theta).float(), model.parameters())
        swag.collect()
    return swag


def test_fsdp_predict_equals_a_single_process_posterior(runs, sharded):
    one = single(result(runs, "fsdp", 0)["ref"])
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(
        sharded.sample(5, seed=3), one.sample(5, seed=3), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        sharded.predict(x, S=5, seed=3), one.predict(x, S=5, seed=3), atol=1e-6
    )
    one.close()


def test_fsdp_ranks_draw_one_z2(runs, sharded):
    """Each rank's own draws (seed 7) have the low-rank part D z₂ of the full posterior's draws at
    that rank's coordinates: one z₂ for all ranks, so the shards of a draw belong together."""
    post = sharded.posterior
    S, K, scale = 3, 4, 0.5
    noise = Noise(7, S, K, np.float32)
    z2 = noise.z2.numpy()
    full = (z2.T @ (post.kept_rows() - post.mean()).astype(np.float32)) / math.sqrt(K - 1)
    parts = []
    for rank in (0, 1):
        with SWAGPosterior.open(
            open_store("mmap", rank_dir(runs / "fsdp", rank, 2), readonly=True), readonly=True
        ) as local:
            z1 = noise.z1(0, local.n_params)  # a rank draws z₁ of its own (local) vector
            draw = result(runs, "fsdp", rank)["draw"]
            parts.append((draw - local.mean()) / math.sqrt(scale) - np.sqrt(local.variance()) * z1)
            local.store.close()
    np.testing.assert_allclose(post._full(parts), full, atol=1e-4)


def test_a_sharded_directory_is_refused_for_writing_or_incomplete(runs, tmp_path):
    with pytest.raises(
        PosteriorError, match="per-rank posteriors of a sharded run: open it with readonly=True"
    ):
        SWAG.open(make_model(), "mmap", runs / "fsdp")
    shutil.copytree(runs / "fsdp", tmp_path / "fsdp")
    (tmp_path / "fsdp" / "rank-1-of-2.json").unlink()
    with pytest.raises(PosteriorError, match=r"shards of ranks \[0\], not of all 2"):
        SWAG.open(make_model(), "mmap", tmp_path / "fsdp", readonly=True)
    with pytest.raises(PosteriorError, match="holds 66 parameters, not 69"):
        SWAG.open(
            nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 1, bias=False)),
            "mmap",
            runs / "fsdp",
            readonly=True,
        )


def test_an_unknown_distributed_mode_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match="distributed='ranks' is not one of auto, local, replicated, sharded"
    ):
        SWAG(make_model(), "mmap", tmp_path / "post", distributed="ranks")
    assert not (tmp_path / "post").exists()
