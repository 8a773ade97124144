"""A SWAG posterior's sampling and evaluation on a dask cluster, next to its zarr log: the only module
that imports dask. Pass `DaskExecutor(client)` as `executor=` to SWAGPosterior.sample, SWAG.predict and
nvmlib.evaluate.evaluate; nothing below this module imports it.

Sampling: D z₂ = Σ_shards z₂[rows]ᵀ·(rows − θ̄). Each task reads whole shards of the log where
they lie (the store's URL, opened on the worker) and accumulates their partial products; the
partials are summed in a tree of tasks on the workers, in a fixed order. z₂ is drawn on the
client from the seed alone, exactly as the local pass draws it, and the tasks depend only on the
log's layout, so the draws do not depend on the number of workers or on who reads what.
Evaluation: the S sampled models' predictions are spread over the workers, summed in the same
kind of tree, and averaged on the client.

Before any task runs, every worker opens the store and checks that it holds this very posterior,
so a cluster that cannot see the store's path fails with an error that says so.
"""
from __future__ import annotations

import copy
import os
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from distributed import get_worker
from distributed.comm import get_address_host
from torch import nn
from nvmlib.progress import tqdm

from nvmlib.backends.zarr import ZarrStore
from nvmlib.errors import ConfigError, StoreError
from nvmlib.log import spans
from nvmlib.swag import LOG, META, SWAGPosterior

# variables dask's nanny sets for its workers; it writes them into *this* process's environment
# before it spawns one, and leaves them there
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
GROUP_BYTES = 1 << 30  # log bytes one task reads (whole shards): the tasks do not depend on the cluster
FAN_IN = 4  # partial results summed by one task of the tree


def _open(url: str, storage_options: dict | None) -> ZarrStore:
    return ZarrStore(url, readonly=True, storage_options=storage_options)


def _probe(url: str, storage_options: dict | None, meta: bytes) -> tuple[str | None, int]:
    """Run on each worker: (None when it reads the posterior whose metadata is `meta`, else why
    not; the CPUs this worker may run on)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        store = _open(url, storage_options)
        held = store.read_rows(META, 0, store.shape(META)[0]).tobytes()
    except Exception as exc:  # anything a worker meets is reported to the client, by worker
        return f"{type(exc).__name__}: {exc}", cpus
    return (None if held == meta else "another posterior is stored at that path on this worker"), cpus


def check_workers(post: SWAGPosterior, client: Any) -> dict[str, int]:
    """Refuse, before any compute, a posterior the client's workers cannot read where it lies;
    else the threads one task may use on each worker (its host's CPUs shared by the worker threads
    there: dask starts workers with one BLAS thread each)."""
    store = post.store
    if not isinstance(store, ZarrStore):
        raise StoreError(f"the posterior is on the {store.describe()}; a dask cluster reads it where it "
                         "lies only on the zarr tier: put it on open_store('zarr', URL) with a URL every "
                         "worker can reach (a shared file system path, or s3://... with storage_options)")
    meta = store.read_rows(META, 0, store.shape(META)[0]).tobytes()
    answers = client.run(_probe, store.url, store.storage_options, meta)
    if not answers:
        raise StoreError("the dask client has no workers: start some (e.g. cluster.scale(2)) and wait for "
                         "them (client.wait_for_workers(2))")
    bad = {worker: why for worker, (why, _) in answers.items() if why}
    if bad:
        worker, why = next(iter(bad.items()))
        raise StoreError(f"{len(bad)} of {len(answers)} dask workers cannot read the posterior at "
                         f"{store.url} (e.g. {worker}: {why}); nothing was computed. Put the posterior "
                         "where every worker sees it: a shared file system mounted at the same path on "
                         "every node, or an object store URL (s3://..., with storage_options)")
    workers = client.scheduler_info()["workers"]
    host_threads = Counter()
    for address, info in workers.items():
        host_threads[get_address_host(address)] += info["nthreads"]
    return {address: max(1, cpus // host_threads[get_address_host(address)]) for address, (_, cpus) in answers.items()}


def shard_groups(post: SWAGPosterior, K: int) -> list[list[tuple[int, int]]]:
    """The kept iterates as runs [t0, t1) that each lie in one shard, grouped into tasks of whole
    shards (about GROUP_BYTES each), in the log's order."""
    t = post.n_collected - K
    if post.meta.get("codec"):  # a compressed log: runs of whole chunks, each decoded from its keyframe
        step = max(1, GROUP_BYTES // (post.n_params * post.dtype.itemsize) // post.log.chunk) * post.log.chunk
        cuts = [t, *range((t // step + 1) * step, post.n_collected, step), post.n_collected]
        return [[(a, b)] for a, b in zip(cuts, cuts[1:])]
    R = post.store.shard_rows(LOG)
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for a, b in spans(t, post.n_collected, post.log.slots, post.log.slots):  # slot ranges, oldest iterate first
        while a < b:
            end = min(b, (a // R + 1) * R)
            by_shard.setdefault(a // R, []).append((t, t + end - a))
            t, a = t + end - a, end
    per_task = max(1, GROUP_BYTES // (R * post.log.row_len * post.dtype.itemsize))
    shards = sorted(by_shard)
    return [[run for s in shards[i:i + per_task] for run in by_shard[s]] for i in range(0, len(shards), per_task)]


def _partial(url: str, storage_options: dict | None, meta: dict, count: int, runs: list[tuple[int, int]],
             z2: np.ndarray, mean: np.ndarray, threads: dict[str, int]) -> np.ndarray:
    """Run on a worker: Σ over `runs` of z₂[run]ᵀ·(rows − θ̄), (S, n_params); z2 holds the runs' rows
    of z₂ in order; `threads`: the threads a task may use, by worker."""
    torch.set_num_threads(threads.get(get_worker().address, 1))
    post = SWAGPosterior.view(_open(url, storage_options), meta, count)
    acc = torch.zeros((z2.shape[1], len(mean)), dtype=torch.from_numpy(z2).dtype)
    at = 0
    for _, rows in post._stream(runs):  # the next shard is read (into a reused buffer) while this one is multiplied
        rows = rows.astype(mean.dtype, copy=False)
        rows -= mean
        acc.addmm_(torch.from_numpy(z2[at:at + len(rows)]).T, torch.from_numpy(rows))
        at += len(rows)
    return acc.numpy()


def _add(*parts: np.ndarray) -> np.ndarray:
    out = parts[0] + parts[1]
    for part in parts[2:]:
        out += part
    return out


def _tree(client: Any, futures: list, combine: Callable) -> Any:
    """The results of `futures` combined FAN_IN at a time, in order, by tasks on the workers."""
    while len(futures) > 1:
        futures = [client.submit(combine, *futures[i:i + FAN_IN], pure=False) if len(futures[i:i + FAN_IN]) > 1
                   else futures[i] for i in range(0, len(futures), FAN_IN)]
    return futures[0].result()


def low_rank(post: SWAGPosterior, z2: np.ndarray, mean: np.ndarray, client: Any) -> np.ndarray:
    """Σ_k z₂ₖ·(θ_k − θ̄) over the K kept rows, (S, n_params) (the local pass's D z₂ before its
    1/√(K−1)), computed by the client's workers."""
    threads = check_workers(post, client)
    K, store = len(z2), post.store
    mean_future = client.scatter(mean, broadcast=True)
    first = post.n_collected - K
    tasks = [client.submit(_partial, store.url, store.storage_options, post.meta, post.n_collected, runs,
                           np.concatenate([z2[t0 - first:t1 - first] for t0, t1 in runs]), mean_future, threads,
                           pure=False)
             for runs in shard_groups(post, K)]
    return _tree(client, tasks, _add)


# ---- evaluation --------------------------------------------------------------------------------
_INPUTS: dict[str, dict[str, torch.Tensor]] = {}  # per worker process: the evaluation's inputs, built once


def _predict(key: str, model: nn.Module, theta: np.ndarray, data: tuple) -> dict[str, np.ndarray]:
    """Run on a worker: the probabilities of `model` with parameters `theta` on every input set."""
    from nvmlib.evaluate import inputs, predict
    from nvmlib.models import set_flat

    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = inputs(*data)
    model = copy.deepcopy(model)  # tasks on one worker share the scattered model
    set_flat(model, theta)
    return {name: predict(model, x) for name, x in _INPUTS[key].items()}


def _add_dicts(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: _add(*(p[name] for p in parts)) for name in parts[0]}


def bma_predict(client: Any, model: nn.Module, thetas: np.ndarray, data: Sequence) -> dict[str, np.ndarray]:
    """nvmlib.evaluate.bma_predict with the S models' predictions spread over the client's workers:
    probabilities averaged over `thetas` on `nvmlib.evaluate.inputs(*data)`."""
    if not client.scheduler_info()["workers"]:
        raise StoreError("the dask client has no workers: start some (e.g. cluster.scale(2))")
    key = uuid.uuid4().hex
    model_future, data_future = client.scatter([copy.deepcopy(model).cpu(), tuple(data)], broadcast=True)
    theta_futures = client.scatter(list(thetas))
    tasks = [client.submit(_predict, key, model_future, theta, data_future, pure=False) for theta in theta_futures]
    sums = _tree(client, tasks, _add_dicts)
    return {name: s / len(thetas) for name, s in sums.items()}


def _swag_predict(model: nn.Module, theta: np.ndarray, x: torch.Tensor, bn: torch.Tensor | None) -> np.ndarray:
    """Run on a worker: one sampled model's probabilities on x, its BatchNorm refreshed on bn."""
    from nvmlib.module import load, probabilities

    model = load(copy.deepcopy(model), theta, bn, update_bn=bn is not None)  # tasks share the scattered model
    return probabilities(model, x)


def swag_predict(client: Any, model: nn.Module, thetas: np.ndarray, x: torch.Tensor,
                 bn: torch.Tensor | None) -> np.ndarray:
    """nvmlib.SWAG.predict's BMA with the sampled models spread over the client's workers."""
    if not client.scheduler_info()["workers"]:
        raise StoreError("the dask client has no workers: start some (e.g. cluster.scale(2))")
    model_future, x_future, bn_future = client.scatter([copy.deepcopy(model).cpu(), x, bn], broadcast=True)
    tasks = [client.submit(_swag_predict, model_future, theta, x_future, bn_future, pure=False)
             for theta in client.scatter(list(thetas))]
    return _tree(client, tasks, _add) / len(thetas)


class DaskExecutor:
    """What the layers below ask a cluster for (executor=): D z₂ of a posterior where its log lies, and
    the BMA of sampled models, each spread over the client's workers."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def low_rank(self, post: SWAGPosterior, z2: np.ndarray, mean: np.ndarray) -> np.ndarray:
        return low_rank(post, z2, mean, self.client)

    def swag_predict(self, model: nn.Module, thetas: np.ndarray, x: torch.Tensor,
                     bn: torch.Tensor | None) -> np.ndarray:
        return swag_predict(self.client, model, thetas, x, bn)

    def bma_predict(self, model: nn.Module, thetas: np.ndarray, data: Sequence) -> dict[str, np.ndarray]:
        return bma_predict(self.client, model, thetas, data)


def connect(address: str) -> DaskExecutor:
    """The executor of a client connected to the dask scheduler at `address`, or a ConfigError."""
    from dask.distributed import Client

    try:
        return DaskExecutor(Client(address, timeout=10))
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"no dask scheduler answers at {address} ({exc}); start one (dask scheduler, "
                          "dask-jobqueue, SSHCluster) and pass its address") from exc


# ---- timing: one process against a LocalCluster ------------------------------------------------
def local_cluster(workers: int) -> tuple[Any, Any]:
    """A dask LocalCluster of `workers` processes sharing this machine's CPUs (a worker runs that
    many tasks at once, so one task's first read overlaps another's products), and its Client.
    Scheduler, workers and the dashboard (which has no authentication) listen on 127.0.0.1 only."""
    from dask.distributed import Client, LocalCluster

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    with environ_kept():
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0")  # any free port: no warning when 8787 is taken
    return cluster, Client(cluster)


@contextmanager
def environ_kept() -> Iterator[None]:
    """Start dask workers without changing this process's environment. dask's nanny puts
    OMP_NUM_THREADS=1 (and the like) into os.environ to spawn a worker and leaves it there: every
    later subprocess of the caller then ran torch on one thread, and so computed other last bits
    (a run resumed in this process differed from the one interrupted in a child). Nannies made
    inside this context set those variables inside their workers instead (dask's `environ`, also
    when they restart one), and os.environ is put back at its end. dask makes a new nanny when
    one is lost or the cluster scales: hold the context for as long as that may happen."""
    import dask

    spawn = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    inside = {**dask.config.get("distributed.nanny.environ"), **{k: spawn.pop(k) for k in THREAD_VARS if k in spawn}}
    saved = dict(os.environ)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn, "distributed.nanny.environ": inside}):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def drop_cache(store: ZarrStore) -> None:
    """Hand a local zarr store's pages back to the OS, so the next pass reads from the device."""
    if not store.local:
        return
    for root, _, files in os.walk(store.url):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def scaling(post: SWAGPosterior, S: int, worker_counts: Sequence[int], seed: int = 0,
            repeats: int = 1) -> pd.DataFrame:
    """Seconds of `post.sample(S)` in this process and on a LocalCluster of each number of workers,
    interleaved (the local pass, then each cluster's, `repeats` times over) so that load from
    elsewhere on a shared machine falls on all alike; each pass reads a cold log (after one warm-up
    call per cluster). Columns: mode, workers, repeat, seconds, max_abs_diff (from the local draws)."""
    def timed(client: Any = None) -> tuple[float, np.ndarray]:
        drop_cache(post.store)
        start = time.perf_counter()
        out = post.sample(S, seed=seed, executor=client and DaskExecutor(client))
        return time.perf_counter() - start, out

    rows, clusters = [], []
    try:
        for workers in worker_counts:
            clusters.append(local_cluster(workers))
            post.sample(1, seed=seed, executor=DaskExecutor(clusters[-1][1]))  # warm-up: imports on the workers
        for repeat in tqdm(range(repeats), desc="sampling passes", unit="round"):
            seconds, local = timed()
            rows.append({"mode": "single process", "workers": 1, "repeat": repeat, "seconds": seconds,
                         "max_abs_diff": 0.0})
            for workers, (_, client) in zip(worker_counts, clusters):
                seconds, out = timed(client)
                rows.append({"mode": "dask", "workers": workers, "repeat": repeat, "seconds": seconds,
                             "max_abs_diff": float(np.abs(out - local).max())})
    finally:
        for cluster, client in clusters:
            client.close()
            cluster.close()
    return pd.DataFrame(rows)
