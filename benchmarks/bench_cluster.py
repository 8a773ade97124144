"""Sampling on a dask cluster and appends to the sharded zarr log, on one machine, in one run.

Measures, on one directory:
  1. the device's sequential write and read bandwidth with `dd oflag=direct` / `iflag=direct`;
  2. append throughput of model_2fc rows (n = 795,010) to the mmap tier and to the zarr tier's
     sharded log (the open shard written in place), as MB/s of posterior rows (target: zarr >= 80%
     of mmap), the two tiers alternated `--repeats` times;
  3. sample(S) over the zarr log of at least 2 GB in this process (the local streamed pass) and on a
     dask LocalCluster of 1 and 2 workers (target: dask <= 1.5x the local pass), each pass reading a
     cold log, the local and the dask passes interleaved `--repeats` times; the mmap tier's local
     pass is printed beside them for reference.
Figures are medians over the repeats (ratios: the median of each round's ratio). The disk and the
CPUs are shared and noisy: read the ratios within this run, not across runs.
Usage: python benchmarks/bench_cluster.py [DIR] [--rows 650] [--samples 30] [--workers 1 2]
       [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_swag import dd_bandwidth  # this directory is on sys.path when a script here runs
from tqdm import tqdm

from nvmlib import SWAGPosterior, open_store
from nvmlib.paper.experiments import scaling
from nvmlib.posterior.log import LOG

N_PARAMS = 795_010  # model_2fc


def fill(kind: str, path: Path, rows: int) -> tuple[SWAGPosterior, float]:
    """A posterior of `rows` kept model_2fc iterates on tier `kind`, and the MB/s of its appends
    (every update, the final checkpoint and persist included)."""
    store = open_store(kind, path)
    post = SWAGPosterior.create(store, N_PARAMS, max_rank=rows, checkpoint_every=50)
    rng = np.random.default_rng(0)
    base, steps = (
        rng.standard_normal(N_PARAMS, dtype=np.float32),
        rng.standard_normal((8, N_PARAMS), dtype=np.float32),
    )
    start = time.perf_counter()
    for t in tqdm(range(rows), desc=f"append {kind}", unit="row", leave=False):
        base += 1e-3 * steps[t % 8]
        post.update(base)
    post.flush()
    seconds = time.perf_counter() - start
    return post, rows * N_PARAMS * 4 / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "dir", nargs="?", help="directory on the device to measure (default: a temporary one)"
    )
    parser.add_argument("--rows", type=int, default=650, help="log rows (650 × 3.18 MB = 2.07 GB)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of each measurement (medians reported)"
    )
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=args.dir))
    try:
        out: dict = {
            "rows": args.rows,
            "log_GB": args.rows * N_PARAMS * 4 / 1e9,
            "samples": args.samples,
            "repeats": args.repeats,
            "cpus": len(os.sched_getaffinity(0)),
            "load_avg_1min": os.getloadavg()[0],
        }
        out.update(dd_bandwidth(work, 2048))
        warm = SWAGPosterior.create(
            open_store("dram"), N_PARAMS, max_rank=2
        )  # compiles the update kernels
        for _ in range(3):
            warm.update(np.ones(N_PARAMS, np.float32))
        appends = []
        mmap_post = zarr_post = None  # the latest round's pair: the last one is measured below
        for _ in range(args.repeats):  # each round: a fresh log on each tier
            if mmap_post is not None:  # drop the previous round's pair and its files
                for post in (mmap_post, zarr_post):
                    post.close()
                    post.store.close()
                shutil.rmtree(work / "mmap")
                shutil.rmtree(work / "p.zarr")
            mmap_post, mmap_MBps = fill("mmap", work / "mmap", args.rows)
            zarr_post, zarr_MBps = fill("zarr", work / "p.zarr", args.rows)
            appends.append((mmap_MBps, zarr_MBps, zarr_MBps / mmap_MBps))
        for key, values in zip(
            ("mmap_append_MBps", "zarr_append_MBps", "zarr_over_mmap_append"),
            zip(*appends, strict=True),
            strict=True,
        ):
            out[key] = float(np.median(values))
            out[key + "_all"] = [round(v, 3) for v in values]
        out["zarr_shard_rows"] = zarr_post.store.shard_rows(LOG)
        start = time.perf_counter()
        mmap_post.sample(args.samples, seed=0)  # O_DIRECT reads: cold
        out["mmap_local_pass_s"] = time.perf_counter() - start
        table = scaling(zarr_post, args.samples, args.workers, seed=0, repeats=args.repeats)
        local = table[table["mode"] == "single process"].set_index("repeat")["seconds"]
        out["zarr_local_pass_s"] = float(local.median())
        out["zarr_local_pass_s_all"] = [round(v, 3) for v in local]
        for workers, runs in table[table["mode"] == "dask"].groupby("workers"):
            runs = runs.set_index("repeat")
            ratios = runs["seconds"] / local
            out[f"dask_{workers}_workers_s"] = float(runs["seconds"].median())
            out[f"dask_{workers}_workers_over_local"] = float(ratios.median())
            out[f"dask_{workers}_workers_over_local_all"] = [round(v, 3) for v in ratios]
            out[f"dask_{workers}_workers_max_abs_diff"] = float(runs["max_abs_diff"].max())
        out.update({f"after_{k}": v for k, v in dd_bandwidth(work, 2048).items()})
        out["after_load_avg_1min"] = os.getloadavg()[0]
        for post in (mmap_post, zarr_post):
            post.close()
            post.store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, value in out.items():
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
