"""Sampling and evaluation on a real dask LocalCluster (processes on 127.0.0.1) over a sharded zarr
log give the local results, survive a killed worker, and refuse bad set-ups before computing
anything."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("dask.distributed")

from nvmlib import SWAGPosterior, open_store  # noqa: E402
from nvmlib import dask as nvd  # noqa: E402
from nvmlib.errors import LockedError, StoreError  # noqa: E402
from nvmlib.paper.cli import main  # noqa: E402

N = 3000  # parameters: 12 KB rows
SHARD = 5 * N * 4  # 5 rows per shard


@pytest.fixture(scope="module")
def cluster():
    """One worker to start with; tests scale it up (starting clusters is what costs time here)."""
    with (
        nvd.environ_kept(),
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cl,
        distributed.Client(cl) as client,
    ):  # the scaling and the killed worker below keep this process's environment
        yield cl, client


def scaled(cluster, n: int):
    cl, client = cluster
    cl.scale(n)
    client.wait_for_workers(n, timeout=120)
    return client


@pytest.fixture(scope="module")
def rings(tmp_path_factory):
    """A ring that has wrapped (31 updates into 13 kept rows), one that has not (17 of 40), and a
    compressed log that has wrapped (each task decodes its chunks from their keyframes)."""
    rng = np.random.default_rng(7)
    out = {}
    for name, max_rank, updates, codec in (
        ("wrapped", 13, 31, None),
        ("unwrapped", 40, 17, None),
        ("compressed", 13, 31, "delta-zstd"),
    ):
        store = open_store("zarr", tmp_path_factory.mktemp(name) / "p.zarr", shard_bytes=SHARD)
        post = SWAGPosterior.create(store, N, max_rank=max_rank, checkpoint_every=4, codec=codec)
        for theta in np.cumsum(rng.standard_normal((updates, N)), axis=0):
            post.update(theta)
        out[name] = post
    yield out
    for post in out.values():
        post.close()
        post.store.close()


@pytest.fixture
def one_shard_per_task(monkeypatch):
    monkeypatch.setattr(nvd, "GROUP_BYTES", 1)  # tiny logs: still several tasks and a tree of sums


SEEN: dict[tuple[str, int], np.ndarray] = {}


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_distributed_sample_equals_local(cluster, rings, workers, one_shard_per_task):
    client = scaled(cluster, workers)
    for name, post in rings.items():
        assert len(post.read_groups(nvd.GROUP_BYTES)) >= 3
        for seed in (0, 1, 2):
            local = post.sample(4, scale=0.5, seed=seed)
            remote = post.sample(4, scale=0.5, seed=seed, executor=nvd.DaskExecutor(client))
            assert remote.dtype == np.float32 and remote.shape == (4, N)
            np.testing.assert_allclose(remote, local, rtol=1e-5, atol=1e-5 * np.abs(local).max())
            # the draws do not depend on the number of workers
            np.testing.assert_allclose(
                remote, SEEN.setdefault((name, seed), remote), rtol=1e-6, atol=1e-6
            )
    wrapped, unwrapped = rings["wrapped"], rings["unwrapped"]
    assert wrapped.n_collected > wrapped.log.slots and unwrapped.n_collected < unwrapped.capacity
    # each task multiplies with the host's CPUs shared among the worker threads there (one each
    # here)
    threads = nvd.check_workers(wrapped, client)
    assert threads == {
        w: max(1, len(os.sched_getaffinity(0)) // workers)
        for w in client.scheduler_info()["workers"]
    }


def test_killing_a_worker_mid_sample_still_gives_the_local_result(
    cluster, tmp_path, one_shard_per_task
):
    client = scaled(cluster, 3)
    n = 400_000
    store = open_store("zarr", tmp_path / "p.zarr", shard_bytes=n * 4)  # one row per shard
    post = SWAGPosterior.create(store, n, max_rank=24, checkpoint_every=12)
    rng = np.random.default_rng(3)
    for _ in range(30):
        post.update(rng.standard_normal(n, dtype=np.float32))
    local = post.sample(16, seed=5)
    result, killed = {}, []
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "x", post.sample(16, seed=5, executor=nvd.DaskExecutor(client))
        )
    )
    thread.start()
    pids = client.run(os.getpid)
    while thread.is_alive() and not killed:  # kill the first worker that holds a partial product
        holders = [
            w for w, keys in client.has_what().items() if any("_partial" in str(k) for k in keys)
        ]
        if holders:
            os.kill(pids[holders[0]], signal.SIGKILL)
            killed.append(holders[0])
        time.sleep(0.005)
    thread.join(timeout=300)
    assert killed, "the computation ended before a worker could be killed"
    np.testing.assert_allclose(result["x"], local, rtol=1e-5, atol=1e-5 * np.abs(local).max())
    post.close()
    store.close()


def test_workers_that_cannot_see_the_store_get_a_clear_error_before_any_compute(cluster):
    client = scaled(cluster, 2)
    store = open_store("zarr", "memory://nvmlib-test/posterior")  # in this process's memory only
    post = SWAGPosterior.create(store, 10, max_rank=4)
    for k in range(5):
        post.update(np.full(10, float(k)))
    tasks_before = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
    with pytest.raises(
        StoreError, match=r"2 of 2 dask workers cannot read the posterior at memory://.*shared file"
    ):
        post.sample(3, seed=0, executor=nvd.DaskExecutor(client))
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == tasks_before
    post.close()


def test_a_posterior_off_the_zarr_tier_is_refused(cluster, tmp_path):
    client = scaled(cluster, 1)
    post = SWAGPosterior.create(open_store("mmap", tmp_path / "mmap"), 10, max_rank=4)
    post.update(np.zeros(10))
    post.update(np.ones(10))
    with pytest.raises(StoreError, match=r"only on a shared tier \(zarr\)"):
        post.sample(2, executor=nvd.DaskExecutor(client))
    post.close()


def test_local_cluster_listens_on_loopback_only():
    """Scheduler, workers and the dashboard (no authentication) accept no connection from another
    host."""
    psutil = pytest.importorskip("psutil")
    cluster, client = nvd.local_cluster(1)
    try:
        me = psutil.Process()
        listening = [
            c.laddr
            for p in (me, *me.children(recursive=True))
            for c in p.net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        ]
        dashboard = int(cluster.dashboard_link.split(":")[2].split("/")[0])
        assert dashboard in {a.port for a in listening}
        assert listening and all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
    finally:
        client.close()
        cluster.close()


def test_a_url_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open the zarr store file://.*check the URL"):
        open_store("zarr", f"file://{tmp_path}/nothing-here.zarr", readonly=True)
    with pytest.raises(StoreError, match="cannot open the zarr store nosuchprotocol://"):
        open_store("zarr", "nosuchprotocol://bucket/posterior")
    with pytest.raises(StoreError, match="not a directory holding a posterior"):
        open_store("zarr", tmp_path / "missing.zarr", readonly=True)


@pytest.mark.parametrize("where", ["directory", "url"])
def test_a_second_writer_is_refused(tmp_path, where):
    path = tmp_path / "p.zarr" if where == "directory" else f"file://{tmp_path}/p.zarr"
    first = SWAGPosterior.create(open_store("zarr", path), 10, max_rank=4)
    first.update(np.ones(10))
    with pytest.raises(LockedError, match="already has a writer in this process"):
        SWAGPosterior.open(open_store("zarr", path))
    reader = SWAGPosterior.open(
        open_store("zarr", path, readonly=True), readonly=True
    )  # readers may
    assert reader.n_collected == 1
    first.close()
    first.store.close()
    second = SWAGPosterior.open(open_store("zarr", path))  # the writer left: the next one may write
    second.update(np.zeros(10))
    assert second.n_collected == 2
    second.close()
    second.store.close()


def test_cli_evaluate_on_a_scheduler_gives_the_local_metrics(cluster, tmp_path):
    client = scaled(cluster, 2)
    post_dir, csv = tmp_path / "p.zarr", tmp_path / "run.csv"
    assert (
        main(
            [
                "train",
                "model_2conv2fc",
                "-e",
                "1",
                "--limit",
                "300",
                "-n",
                "0.05",
                "--backend",
                "zarr",
                "--posterior_path",
                str(post_dir),
                "--results_filepath",
                str(csv),
                "--no_progress",
            ]
        )
        == 0
    )
    common = [
        "evaluate",
        "--backend",
        "zarr",
        "--posterior_path",
        str(post_dir),
        "-S",
        "3",
        "--angles",
        "0",
        "90",
        "--limit",
        "300",
    ]
    assert main(common + ["--results_filepath", str(tmp_path / "local.json")]) == 0
    assert (
        main(
            common
            + [
                "--scheduler",
                client.scheduler.address,
                "--results_filepath",
                str(tmp_path / "cluster.json"),
            ]
        )
        == 0
    )
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "cluster"))
    assert len(local["metrics"]) == len(remote["metrics"]) == 6
    for a, b in zip(
        local["metrics"] + local["ood"], remote["metrics"] + remote["ood"], strict=True
    ):
        assert {k: v for k, v in a.items() if isinstance(v, str)} == {
            k: v for k, v in b.items() if isinstance(v, str)
        }
        for key, value in a.items():
            if not isinstance(value, str):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("tier", ["zarr", "mmap"])
def test_swag_predict_on_a_cluster_equals_local(cluster, tmp_path, tier):
    """nvmlib.SWAG.predict(executor=DaskExecutor(client)): BatchNorm refresh and prediction on the
    workers (and, on the zarr tier, the sampling pass too) give the local BMA."""
    import torch

    from nvmlib import SWAG
    from nvmlib.paper.any_model import convnet

    client = scaled(cluster, 2)
    torch.manual_seed(0)
    model = convnet(4)
    x = torch.randn(40, 1, 28, 28)
    with SWAG(model, tier, tmp_path / "p", max_rank=5) as swag:
        for _ in range(7):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            swag.collect()
        local = swag.predict(x, S=4, bn_loader=x[:20], seed=3)
        there = swag.predict(x, S=4, bn_loader=x[:20], seed=3, executor=nvd.DaskExecutor(client))
    np.testing.assert_allclose(there, local, rtol=0, atol=1e-5)


def test_a_local_cluster_leaves_this_process_environment_alone():
    """dask's nanny wrote OMP_NUM_THREADS=1 (and MKL/OPENBLAS) into this process's environment and
    left it: every later subprocess ran torch on one thread and trained to other last bits than this
    process (test_pymm's resume after a SIGKILL then differed from the uninterrupted run). The
    workers still get dask's thread settings."""
    before = dict(os.environ)
    cluster, client = nvd.local_cluster(2)
    with cluster, client:
        client.wait_for_workers(2, timeout=120)
        assert dict(os.environ) == before
        assert (
            list(client.run(lambda: [os.environ.get(k) for k in nvd.THREAD_VARS]).values())
            == [["1"] * 3] * 2
        )
