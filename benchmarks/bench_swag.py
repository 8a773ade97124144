"""Posterior-log throughput on the mmap tier, as ratios to this machine's own device limits.

Measures, in one run on one directory:
  1. the device's sequential write/read bandwidth with `dd oflag=direct` / `iflag=direct`;
  2. time per update for model_2fc (n = 795,010) at max_rank=100 and max_rank=10,000
     (the update cost must not grow with K) and the append throughput against dd;
  3. sample(30) (one streamed pass) against one cold sequential read of the log, and
     against 30 calls of sample(1).
Usage: python benchmarks/bench_swag.py [DIR] [--updates 300] [--rows 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from nvmlib import SWAGPosterior, open_store
from nvmlib.swag import LOG

N_PARAMS = 795_010  # model_2fc


def dd_bandwidth(directory: Path, mbytes: int = 2048) -> tuple[float, float]:
    """(write, read) MB/s of a `dd` with O_DIRECT through `directory`'s device."""
    target = directory / "dd.bench"
    speeds = []
    for args in ([f"if=/dev/zero", f"of={target}", "oflag=direct"], [f"if={target}", "of=/dev/null", "iflag=direct"]):
        run = subprocess.run(["dd", "bs=16M", f"count={mbytes // 16}", *args], capture_output=True, text=True, check=True)
        m = re.search(r"copied, ([\d.]+) s", run.stderr)
        speeds.append(mbytes * 2**20 / float(m.group(1)) / 1e6)
    target.unlink()
    return speeds[0], speeds[1]


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def time_updates(directory: Path, max_rank: int, thetas: np.ndarray, updates: int) -> float:
    """Seconds per update (the final flush included) for `updates` updates after a warm-up."""
    store = open_store("mmap", directory)
    post = SWAGPosterior.create(store, N_PARAMS, max_rank=max_rank, checkpoint_every=100)
    for i in range(10):
        post.update(thetas[i % len(thetas)])
    post.flush()
    t0 = time.perf_counter()
    for i in range(updates):
        post.update(thetas[i % len(thetas)])
    post.flush()
    dt = (time.perf_counter() - t0) / updates
    post.close()
    store.close()
    shutil.rmtree(directory)
    return dt


def bench_sampling(directory: Path, thetas: np.ndarray, rows: int) -> dict:
    store = open_store("mmap", directory)
    post = SWAGPosterior.create(store, N_PARAMS, max_rank=rows)
    for i in range(rows):
        post.update(thetas[i % len(thetas)] + i * 1e-4)
    post.flush()
    log_file = directory / f"{LOG}.npy"

    def cold(fn):
        drop_cache(log_file)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def read_log():
        with open(log_file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    buf = bytearray(64 << 20)
    t_read = cold(read_log)
    t_s30 = cold(lambda: post.sample(30, seed=0))
    t_s1x30 = sum(cold(lambda: post.sample(1, seed=s)) for s in range(30))
    post.close()
    store.close()
    shutil.rmtree(directory)
    mb = rows * N_PARAMS * 4 / 1e6
    return {"log_MB": mb, "read_s": t_read, "sample30_s": t_s30, "sample1x30_s": t_s1x30,
            "sample30_over_read": t_s30 / t_read, "sample1x30_over_sample30": t_s1x30 / t_s30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", default=None, help="directory on the device to measure (default: a temp dir)")
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--rows", type=int, default=300, help="rows in the log for the sampling benchmark")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="nvmlib-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    thetas = rng.standard_normal((8, N_PARAMS)).astype(np.float32)

    dd_w, dd_r = dd_bandwidth(base)
    t100 = time_updates(base / "k100", 100, thetas, args.updates)
    t10k = time_updates(base / "k10000", 10_000, thetas, args.updates)
    row_mb = N_PARAMS * 4 / 1e6
    res = {"n_params": N_PARAMS, "row_MB": row_mb, "dd_write_MBps": dd_w, "dd_read_MBps": dd_r,
           "update_ms_K100": t100 * 1e3, "update_ms_K10000": t10k * 1e3, "K10000_over_K100": t10k / t100,
           "append_MBps": row_mb / t100, "append_over_dd_write": row_mb / t100 / dd_w}
    res.update(bench_sampling(base / "sample", thetas, args.rows))
    for key, value in res.items():
        print(f"{key:28s} {value:12.3f}")
    checks = {"update cost K=10,000 within 1.15x of K=100": res["K10000_over_K100"] <= 1.15,
              "append >= 80% of dd write bandwidth": res["append_over_dd_write"] >= 0.8,
              "sample(30) <= 1.5x one sequential read": res["sample30_over_read"] <= 1.5,
              "30 x sample(1) >= 10x sample(30)": res["sample1x30_over_sample30"] >= 10}
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "checks": checks}, indent=2))
    if args.dir is None:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
