"""Glue for the notebooks: each experiment of the paper as one function returning tidy tables.

tier_runtime   train once per tier for max(epochs) epochs; the ratio at E epochs uses the first E
               (an E-epoch run does the same work up to there; the log is reserved for the run).
quality        train once, then replay the log into a growing posterior and evaluate it at each K
               (rotated MNIST only at the largest K, the one its figure shows).
sampling       S samples in one streamed pass over the log versus S single-sample passes.
scaling        sample() in this process and on local dask clusters of several sizes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from nvmlib.backends import Store, available_tiers, open_store
from nvmlib.nn.predict import bma
from nvmlib.paper.data import Split
from nvmlib.paper.evaluate import ANGLES, METHODS, entropy, evaluate, reliability_table
from nvmlib.paper.models import make_model, n_params, set_flat
from nvmlib.paper.train import TrainConfig, TrainResult, machine_facts, train, versions
from nvmlib.posterior import SWAGPosterior
from nvmlib.progress import tqdm

EPOCH_KEY = re.compile(r"epoch (\d+) time \(s\)")
REPLAY_ROWS = 64  # log rows read at a time when replaying


# ---- records ------------------------------------------------------------------------------------
def write_record(
    name: str, parameters: dict[str, Any], measured: dict[str, Any], results_dir: str | Path
) -> Path:
    """results_dir/name.json: what an experiment measured, with its parameters, versions and
    machine."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "experiment": name,
        "parameters": parameters,
        "measured": measured,
        "versions": versions(),
        "machine": machine_facts(torch.device("cpu")),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def tables(frames: dict[str, pd.DataFrame]) -> dict[str, list[dict]]:
    """DataFrames as JSON-ready lists of rows, for write_record."""
    return {key: frame.to_dict(orient="records") for key, frame in frames.items()}


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (None keeps torch's default).

    One compute thread leaves the other cores to the tier's I/O, as the paper's GPU training did.
    """
    if threads:
        torch.set_num_threads(threads)


# ---- collecting -------------------------------------------------------------------------------
def epoch_table(timings: dict[str, float]) -> pd.DataFrame:
    """Seconds of each epoch from a run's timings: columns epoch, seconds."""
    rows = [
        {"epoch": int(m.group(1)), "seconds": v}
        for k, v in timings.items()
        if (m := EPOCH_KEY.fullmatch(k))
    ]
    return pd.DataFrame(rows, columns=["epoch", "seconds"]).sort_values("epoch", ignore_index=True)


@contextmanager
def tier_location(
    backend: str, path: str | None, scratch_dir: str | Path, label: str
) -> Iterator[str | None]:
    """Where a tier keeps a posterior: `path`, else scratch_dir/label, removed afterwards (dram:
    none)."""
    if backend == "dram" or path is not None:
        yield path
        return
    scratch = Path(scratch_dir) / label
    try:
        yield str(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_on_tier(
    config: TrainConfig, label: str, scratch_dir: str | Path
) -> tuple[dict[str, float], dict]:
    """Train `config` on its tier and drop the posterior: (timings, record)."""
    with tier_location(config.backend, config.posterior_path, scratch_dir, label) as path:
        result = train(replace(config, posterior_path=path, overwrite=True))
        result.close()
    return result.timings, result.record


# ---- tier runtime -----------------------------------------------------------------------------
def usable_tiers(
    tiers: dict[str, Sequence[str | None]],
) -> tuple[dict[str, tuple[str, str | None]], dict[str, str]]:
    """Split {label: (backend, path)} into the tiers this machine has and {label: why not} for the
    rest."""
    status = available_tiers()
    ok, skipped = {}, {}
    for label, (backend, path) in tiers.items():
        if status.get(backend) == "ok":
            ok[label] = (backend, path)
        else:
            skipped[label] = status.get(backend, f"unknown tier {backend!r}")
    if "dram" not in {b for b, _ in ok.values()}:
        raise ValueError("tier_runtime reports ratios to DRAM: include a dram tier")
    return ok, skipped


def tier_runtime(
    base: TrainConfig,
    tiers: dict[str, tuple[str, str | None]],
    epochs: Sequence[int],
    scratch_dir: str | Path,
) -> pd.DataFrame:
    """One row per (tier, E in epochs): average epoch time and total time over the first E epochs,
    their ratios to DRAM, and the rate at which the posterior was written (MB/s)."""
    rows = []
    for label, (backend, path) in tiers.items():
        config = replace(base, backend=backend, posterior_path=path, epochs=max(epochs))
        timings, record = run_on_tier(config, label, scratch_dir)
        per_epoch = epoch_table(timings).seconds.to_numpy()
        setup = timings["open shelf time (s)"] + timings["make posterior time (s)"]
        row_bytes = record["posterior"]["n_params"] * np.dtype(config.dtype).itemsize
        updates = (record["posterior"]["n_collected"] - 1) / config.epochs
        for e in epochs:
            epoch_s = float(per_epoch[:e].mean())
            rows.append(
                {
                    "tier": label,
                    "backend": backend,
                    "epochs": e,
                    "epoch_s": epoch_s,
                    "total_s": setup
                    + float(per_epoch[:e].sum())
                    + timings["posterior finalize time (s)"],
                    "write_MBps": updates * row_bytes / epoch_s / 1e6,
                }
            )
    table = pd.DataFrame(rows)
    dram = table[table.backend == "dram"].groupby("epochs")[["epoch_s", "total_s"]].first()
    table["epoch_ratio"] = table.epoch_s / table.epochs.map(dram.epoch_s)
    table["total_ratio"] = table.total_s / table.epochs.map(dram.total_s)
    return table


def device_bandwidth(
    tiers: dict[str, Sequence[str | None]], scratch_dir: str | Path, nbytes: int
) -> dict[str, dict[str, Any]]:
    """{"device under <tiers>": probe.sequential_bandwidth} for each directory the file tiers use
    (write_MBps, read_MBps); devices (devdax) are not measured."""
    from nvmlib.paper.probe import sequential_bandwidth

    where: dict[Path, list[str]] = {}
    for label, (backend, path) in tiers.items():
        if backend != "dram":
            where.setdefault(Path(path) if path else Path(scratch_dir), []).append(label)
    out = {}
    for location, labels in where.items():
        if location == Path(scratch_dir):
            location.mkdir(parents=True, exist_ok=True)
        if location.is_dir():
            out[f"device under {', '.join(labels)}"] = sequential_bandwidth(location, nbytes)
    return out


# ---- posterior quality ------------------------------------------------------------------------
def growing(
    posterior: SWAGPosterior, ranks: Sequence[int], store: Store
) -> Iterator[tuple[int, SWAGPosterior, np.ndarray]]:
    """(K, posterior of the first K iterates, iterate K) for each K in increasing `ranks`, by
    replaying the log of a posterior that kept every iterate into a new one on `store`."""
    if posterior.max_rank is not None or max(ranks) > posterior.n_collected:
        raise ValueError(
            f"replaying K up to {max(ranks)} needs a posterior that kept every iterate "
            f"(max_rank=None) and collected that many; it has {posterior.n_collected}"
        )
    grown = SWAGPosterior.create(
        store, posterior.n_params, capacity=max(ranks), dtype=str(posterior.dtype), overwrite=True
    )
    try:
        for k in ranks:
            for start in range(grown.n_collected, k, REPLAY_ROWS):
                rows = posterior.iterates(start, min(start + REPLAY_ROWS, k))
                for row in rows:
                    grown.update(row)
            yield k, grown, rows[-1]
    finally:
        grown.close()


def quality(
    result: TrainResult,
    ranks: Sequence[int],
    test: Split,
    ood: Split,
    samples: int,
    replay: Store,
    scale: float = 0.5,
    seed: int = 0,
    angles: Sequence[float] = ANGLES,
) -> dict[str, pd.DataFrame]:
    """Evaluate SGD (iterate K), SWA and SWAG (first K iterates, replayed onto `replay`) at each K;
    at the largest K also rotated MNIST at `angles`, the reliability bins and the OOD entropies.
    Tables: metrics, ood, reliability, entropy."""
    ranks = sorted({k for k in ranks if 2 <= k <= result.posterior.n_collected})
    if not ranks:
        raise ValueError(
            f"no K in 2..{result.posterior.n_collected} (the iterates collected) was asked for"
        )
    model = make_model(result.record["config"]["model"]).to(next(result.model.parameters()).device)
    metrics, aurocs, reliability, scores = [], [], [], []
    steps = tqdm(
        growing(result.posterior, ranks, replay),
        total=len(ranks),
        desc="evaluating posteriors",
        unit="K",
    )
    for k, posterior, theta in steps:
        set_flat(model, theta)
        ev = evaluate(
            model,
            posterior,
            test,
            ood,
            samples=samples,
            scale=scale,
            seed=seed,
            angles=angles if k == ranks[-1] else [0],
        )
        metrics.append(ev.metrics.assign(K=k))
        aurocs.append(ev.ood.assign(K=k))
        if k < ranks[-1]:
            continue
        thetas = {
            "SGD": [theta],
            "SWA": [posterior.mean()],
            "SWAG": posterior.sample(samples, scale=scale, seed=seed),
        }
        inputs = {"in": test.tensors()[0], "out": ood.tensors()[0]}
        for method in METHODS:
            probs = bma(model, thetas[method], inputs, update_bn=False)
            reliability.append(reliability_table(probs["in"], test.labels).assign(method=method))
            scores += [
                pd.DataFrame({"method": method, "data": data, "entropy": entropy(p)})
                for data, p in probs.items()
            ]
    return {
        "metrics": pd.concat(metrics, ignore_index=True),
        "ood": pd.concat(aurocs, ignore_index=True),
        "reliability": pd.concat(reliability, ignore_index=True),
        "entropy": pd.concat(scores, ignore_index=True),
    }


# ---- sampling throughput ------------------------------------------------------------------------
def sampling(
    model: str,
    backend: str,
    path: str | None,
    scratch_dir: str | Path,
    rank: int,
    sample_counts: Sequence[int],
    passes_up_to: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Time S samples from a posterior of `rank` iterates of `model`'s size on a tier: one streamed
    pass (sample(S)) versus S passes (S × sample(1), only for S ≤ passes_up_to), after one untimed
    pass. Columns S, mode, passes, seconds, read_MBps (log bytes read per second)."""
    n = n_params(make_model(model))
    rng = np.random.default_rng(seed)
    rows = []
    with (
        tier_location(backend, path, scratch_dir, "sampling") as where,
        open_store(backend, where) as store,
    ):
        post = SWAGPosterior.create(store, n, capacity=rank, model=model, overwrite=True)
        try:
            base = rng.standard_normal(n).astype(np.float32)
            for _ in range(rank):
                post.update(base + 0.01 * rng.standard_normal(n).astype(np.float32))
            post.flush()
            post.sample(1, seed=seed)
            log_bytes = rank * n * post.dtype.itemsize
            for s in tqdm(sample_counts, desc=f"sampling on {backend}", unit="S"):
                for mode, passes in (("one streamed pass", 1), ("S passes", s)):
                    if passes > 1 and s > passes_up_to:
                        continue
                    t = time.perf_counter()
                    for i in range(passes):
                        post.sample(s if passes == 1 else 1, seed=seed + i)
                    seconds = time.perf_counter() - t
                    rows.append(
                        {
                            "S": s,
                            "mode": mode,
                            "passes": passes,
                            "seconds": seconds,
                            "read_MBps": passes * log_bytes / seconds / 1e6,
                        }
                    )
        finally:
            post.close()
    return pd.DataFrame(rows)


# ---- sampling on a dask cluster ----------------------------------------------------------------
def drop_cache(path: Path | None) -> None:
    """Hand the pages of a file, or of every file under a directory, back to the OS, so that the
    next pass reads from the device (nothing for a store without files)."""
    if path is None:
        return
    files = [path] if path.is_file() else [Path(r) / n for r, _, ns in os.walk(path) for n in ns]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def scaling(
    post: SWAGPosterior, S: int, worker_counts: Sequence[int], seed: int = 0, repeats: int = 1
) -> pd.DataFrame:
    """Seconds of `post.sample(S)` in this process and on a LocalCluster of each number of workers,
    interleaved (the local pass, then each cluster's, `repeats` times over) so that load from
    elsewhere on a shared machine falls on all alike; each pass reads a cold log (after one warm-up
    call per cluster). Columns: mode, workers, repeat, seconds, max_abs_diff (from the local
    draws)."""
    from nvmlib import dask  # the edge that imports dask, only when a cluster is asked for

    def timed(client: Any = None) -> tuple[float, np.ndarray]:
        drop_cache(post.store.path)
        start = time.perf_counter()
        out = post.sample(S, seed=seed, executor=client and dask.DaskExecutor(client))
        return time.perf_counter() - start, out

    rows, clusters = [], []
    try:
        for workers in worker_counts:
            clusters.append(dask.local_cluster(workers))
            post.sample(
                1, seed=seed, executor=dask.DaskExecutor(clusters[-1][1])
            )  # warm-up: imports on the workers
        for repeat in tqdm(range(repeats), desc="sampling passes", unit="round"):
            seconds, local = timed()
            rows.append(
                {
                    "mode": "single process",
                    "workers": 1,
                    "repeat": repeat,
                    "seconds": seconds,
                    "max_abs_diff": 0.0,
                }
            )
            for workers, (_, client) in zip(worker_counts, clusters, strict=True):
                seconds, out = timed(client)
                rows.append(
                    {
                        "mode": "dask",
                        "workers": workers,
                        "repeat": repeat,
                        "seconds": seconds,
                        "max_abs_diff": float(np.abs(out - local).max()),
                    }
                )
    finally:
        for cluster, client in clusters:
            client.close()
            cluster.close()
    return pd.DataFrame(rows)
