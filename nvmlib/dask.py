"""A SWAG posterior's sampling and model averaging on a dask cluster, next to its log: the only
module that imports dask. Pass `DaskExecutor(client)` as `executor=` to SWAGPosterior.sample,
SWAG.predict and nvmlib.paper.evaluate.evaluate; nothing else in nvmlib imports this module.

Sampling: D z₂ = Σ_groups z₂[rows]ᵀ·(rows − θ̄). Each task reads a group of whole shards of the log
where they lie (the store reopened on the worker: Store.reopen_args) and runs the posterior's own
D·z₂ kernel (nvmlib.posterior.sampling.low_rank) on them; the partials are summed in a tree of
tasks on the workers, in a fixed order. z₂ is drawn on the client from the seed alone, exactly as
the local pass draws it, and the groups depend only on the log's layout, so the draws do not depend
on the number of workers or on who reads what.
Model averaging: the S sampled models are spread over the workers, each task runs the one BMA of
nvmlib.nn.predict on its share, and the sums are added in the same kind of tree.

Before any task runs, every worker opens the store and checks that it holds this very posterior,
so a cluster that cannot see the store's path fails with an error that says so.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from distributed import get_worker
from distributed.comm import get_address_host
from torch import nn

from nvmlib.backends import Store, open_store
from nvmlib.errors import ConfigError, StoreError
from nvmlib.nn.predict import Loader, bma_sums
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import META
from nvmlib.posterior.sampling import low_rank

# variables dask's nanny sets for its workers; it writes them into *this* process's environment
# before it spawns one, and leaves them there
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
GROUP_BYTES = (
    1 << 30
)  # log bytes one task reads (whole shards): the tasks do not depend on the cluster
FAN_IN = 4  # partial results summed by one task of the tree


def _open(where: tuple[str, str, dict]) -> Store:
    tier, path, options = where
    return open_store(tier, path, readonly=True, **options)


def _probe(where: tuple[str, str, dict], meta: bytes) -> tuple[str | None, int]:
    """Run on each worker: (None when it reads the posterior whose metadata is `meta`, else why
    not; the CPUs this worker may run on)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        store = _open(where)
        held = store.read_rows(META, 0, store.shape(META)[0]).tobytes()
    except Exception as exc:  # anything a worker meets is reported to the client, by worker
        return f"{type(exc).__name__}: {exc}", cpus
    return (
        None if held == meta else "another posterior is stored at that path on this worker"
    ), cpus


def _no_workers(client: Any) -> None:
    if not client.scheduler_info()["workers"]:
        raise StoreError(
            "the dask client has no workers: start some (e.g. cluster.scale(2)) and "
            "wait for them (client.wait_for_workers(2))"
        )


def check_workers(post: SWAGPosterior, client: Any) -> dict[str, int]:
    """Refuse, before any compute, a posterior the client's workers cannot read where it lies;
    else the threads one task may use on each worker (its host's CPUs shared by the worker threads
    there: dask starts workers with one BLAS thread each)."""
    store = post.store
    if not store.shared:
        raise StoreError(
            f"the posterior is on the {store.describe()}; a dask cluster reads it where "
            "it lies only on a shared tier (zarr): put it on open_store('zarr', URL) "
            "with a URL every worker can reach (a shared file system path, or s3://... "
            "with storage_options)"
        )
    _no_workers(client)
    meta = store.read_rows(META, 0, store.shape(META)[0]).tobytes()
    answers = client.run(_probe, store.reopen_args(), meta)
    bad = {worker: why for worker, (why, _) in answers.items() if why}
    if bad:
        worker, why = next(iter(bad.items()))
        raise StoreError(
            f"{len(bad)} of {len(answers)} dask workers cannot read the posterior at "
            f"{store.reopen_args()[1]} (e.g. {worker}: {why}); nothing was computed. "
            "Put the posterior where every worker sees it: a shared file system mounted "
            "at the same path on every node, or an object store URL (s3://..., with "
            "storage_options)"
        )
    workers = client.scheduler_info()["workers"]
    host_threads: Counter = Counter()
    for address, info in workers.items():
        host_threads[get_address_host(address)] += info["nthreads"]
    return {
        address: max(1, cpus // host_threads[get_address_host(address)])
        for address, (_, cpus) in answers.items()
    }


def _partial(
    where: tuple[str, str, dict],
    meta: dict,
    count: int,
    runs: list[tuple[int, int]],
    coef: np.ndarray,
    mean: np.ndarray,
    first: int,
    threads: dict[str, int],
) -> np.ndarray:
    """Run on a worker: the D·z₂ kernel over the iterates of `runs` (S, n_params), with the
    coefficients (K, S) the posterior's deviations give z₂; `threads`: the threads a task may
    use, by worker."""
    torch.set_num_threads(threads.get(get_worker().address, 1))
    post = SWAGPosterior.view(_open(where), meta, count)
    return low_rank(post.stream(runs), torch.from_numpy(coef), mean, first).numpy()


def _add(*parts: Any) -> Any:
    """The sum of arrays, or of dicts of arrays name by name."""
    if isinstance(parts[0], dict):
        return {name: _add(*(p[name] for p in parts)) for name in parts[0]}
    out = parts[0] + parts[1]
    for part in parts[2:]:
        out += part
    return out


def _tree(client: Any, futures: list, combine: Callable) -> Any:
    """The results of `futures` combined FAN_IN at a time, in order, by tasks on the workers."""
    while len(futures) > 1:
        futures = [
            client.submit(combine, *futures[i : i + FAN_IN], pure=False)
            if len(futures[i : i + FAN_IN]) > 1
            else futures[i]
            for i in range(0, len(futures), FAN_IN)
        ]
    return futures[0].result()


_INPUTS: dict[str, dict[str, Loader]] = {}  # per worker process: inputs a task builds, built once


def _bma_part(
    key: str,
    model: nn.Module,
    thetas: list[np.ndarray],
    inputs: Any,
    bn: Loader | None,
    update_bn: bool,
) -> dict[str, np.ndarray]:
    """Run on a worker: the BMA sums of `thetas`' models on `inputs` (a dict, or a function that
    builds it: called once per worker process and call of DaskExecutor.bma, `key`)."""
    if callable(inputs):
        if key not in _INPUTS:
            _INPUTS.clear()
            _INPUTS[key] = inputs()
        inputs = _INPUTS[key]
    model = copy.deepcopy(model)  # tasks on one worker share the scattered model
    return bma_sums(model, thetas, inputs, bn, update_bn)[0]


class DaskExecutor:
    """What the layers below ask a cluster for (executor=): D z₂ of a posterior where its log lies,
    and the BMA of sampled models, each spread over the client's workers."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def low_rank(self, post: SWAGPosterior, coef: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Σ_k cₖ·(θ_k − θ̄) over the K kept rows, (S, n_params), for the coefficients coef (K, S)
        that sampling.coefficients gives z₂ for the posterior's deviations (the local pass's D z₂
        before its 1/√(K−1)), computed by the client's workers."""
        client = self.client
        threads = check_workers(post, client)
        mean_future, coef_future = client.scatter([mean, coef], broadcast=True)
        first = post.n_collected - len(coef)
        where = post.store.reopen_args()
        tasks = [
            client.submit(
                _partial,
                where,
                post.meta,
                post.n_collected,
                runs,
                coef_future,
                mean_future,
                first,
                threads,
                pure=False,
            )
            for runs in post.read_groups(GROUP_BYTES)
        ]
        return _tree(client, tasks, _add)

    def bma(
        self,
        model: nn.Module,
        thetas: np.ndarray,
        inputs: dict[str, Loader] | Callable,
        bn: Loader | None = None,
        update_bn: bool = True,
    ) -> dict[str, np.ndarray]:
        """nvmlib.nn.predict.bma with the models of `thetas` spread over the workers (one task per
        model); `inputs` may be a picklable function that builds them on each worker."""
        client = self.client
        _no_workers(client)
        model_f, inputs_f, bn_f = client.scatter(
            [copy.deepcopy(model).cpu(), inputs, bn], broadcast=True
        )
        key = uuid.uuid4().hex
        tasks = [
            client.submit(_bma_part, key, model_f, [theta], inputs_f, bn_f, update_bn, pure=False)
            for theta in client.scatter(list(thetas))
        ]
        sums = _tree(client, tasks, _add)
        return {name: s / len(thetas) for name, s in sums.items()}


def connect(address: str) -> DaskExecutor:
    """The executor of a client connected to the dask scheduler at `address`, or a ConfigError."""
    from dask.distributed import Client

    try:
        return DaskExecutor(Client(address, timeout=10))
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(
            f"no dask scheduler answers at {address} ({exc}); start one (dask scheduler, "
            "dask-jobqueue, SSHCluster) and pass its address"
        ) from exc


def local_cluster(workers: int) -> tuple[Any, Any]:
    """A dask LocalCluster of `workers` processes sharing this machine's CPUs (a worker runs that
    many tasks at once, so one task's first read overlaps another's products), and its Client.
    Scheduler, workers and the dashboard (which has no authentication) listen on 127.0.0.1 only."""
    from dask.distributed import Client, LocalCluster

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    with environ_kept():
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )  # any free port: no warning when 8787 is taken
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
    inside = {
        **dask.config.get("distributed.nanny.environ"),
        **{k: spawn.pop(k) for k in THREAD_VARS if k in spawn},
    }
    saved = dict(os.environ)
    try:
        with dask.config.set(
            {"distributed.nanny.pre-spawn-environ": spawn, "distributed.nanny.environ": inside}
        ):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
