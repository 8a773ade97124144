"""Posterior-log throughput on the mmap tier, as ratios to this machine's own device limits.

Measures, in one run on one directory:
  1. the device's sequential write/read bandwidth with `dd oflag=direct` / `iflag=direct`;
  2. time per update for model_2fc (n = 795,010) at max_rank=100 and max_rank=10,000
     (the update cost must not grow with K) and the append throughput against dd. This disk,
     like many SSDs and virtual disks, writes fresh blocks slower than written ones, so K=10,000
     is timed on its first lap (fresh blocks, against dd to a new file) and on blocks written
     once before (the ring's steady state, against K=100 and dd overwriting a file). The device
     is noisy, so each round measures dd and then every case, ratios are taken within a round,
     and the medians of the rounds are reported;
  3. sample(30) (one streamed pass) against one cold sequential read of the log, and
     against 30 calls of sample(1);
  4. the CPU cost of the log's row checksums (xxHash3, written with each row, verified on every
     read): stamping one row against the update time, verifying the whole log against sample(30)
     and against the cold read. Both run on pool threads, overlapped with I/O and the moments, so
     these serial costs bound the overhead from above.
Usage: python benchmarks/bench_swag.py [DIR] [--updates 500] [--rounds 5] [--rows 300]
       [--json out.json]
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
from tqdm import tqdm

from nvmlib import SWAGPosterior, open_store
from nvmlib.paper.experiments import drop_cache
from nvmlib.posterior.checksum import digest, identity_seed, row_seed
from nvmlib.posterior.log import LOG

N_PARAMS = 795_010  # model_2fc
CHECKPOINT_EVERY = 50  # the same for every K (K=100 allows at most K/2)


def dd(*args: str) -> float:
    """Seconds a `dd bs=16M` with the given operands took (from its own report)."""
    run = subprocess.run(["dd", "bs=16M", *args], capture_output=True, text=True, check=True)
    return float(re.search(r"copied, ([\d.]+) s", run.stderr).group(1))


def dd_bandwidth(directory: Path, mbytes: int = 2048) -> dict[str, float]:
    """MB/s of O_DIRECT `dd` through `directory`'s device: a write to fresh blocks, an overwrite of
    written blocks (many devices and virtual disks are faster at these), and a read."""
    target, count, mb = directory / "dd.bench", f"count={mbytes // 16}", mbytes * 2**20 / 1e6
    fresh = dd("if=/dev/zero", f"of={target}", count, "oflag=direct")
    over = dd("if=/dev/zero", f"of={target}", count, "oflag=direct", "conv=notrunc")
    read = dd(f"if={target}", "of=/dev/null", count, "iflag=direct")
    target.unlink()
    return {
        "dd_write_fresh_MBps": mb / fresh,
        "dd_write_over_MBps": mb / over,
        "dd_read_MBps": mb / read,
    }


def write_json(path: str | None, report: dict) -> None:
    """The benchmark's figures as JSON at `path` (nothing when None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


def dd_read_file(path: Path) -> float:
    """Seconds `dd iflag=direct` takes to read `path` (the device's limit for one pass over it)."""
    return dd(f"if={path}", "of=/dev/null", "iflag=direct")


def prewrite(file: Path, start: int, nbytes: int) -> None:
    """Write bytes start..start+nbytes of `file` once (durably, uncached), as a ring's first lap
    would."""
    zeros = bytes(64 << 20)
    fd = os.open(file, os.O_WRONLY)
    for off in range(start, start + nbytes, len(zeros)):
        os.pwrite(fd, zeros[: min(len(zeros), start + nbytes - off)], off)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def time_updates(
    directory: Path, max_rank: int, thetas: np.ndarray, updates: int, lapped: bool = False
) -> float:
    """Seconds per update (the final flush included) for `updates` updates after a warm-up; with
    `lapped`, on log blocks written once before (the steady state of a ring after its first lap)."""
    store = open_store("mmap", directory)
    post = SWAGPosterior.create(
        store, N_PARAMS, max_rank=max_rank, checkpoint_every=CHECKPOINT_EVERY
    )
    if lapped:
        log = np.load(directory / f"{LOG}.npy", mmap_mode="r")
        prewrite(directory / f"{LOG}.npy", log.offset, (updates + 10) * log.strides[0])
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
    t_s1x30 = sum(cold(lambda s=s: post.sample(1, seed=s)) for s in range(30))
    t_dd = dd_read_file(log_file)
    # the checksum's CPU time alone, on the rows in memory: what verifying the log and stamping a
    # row cost (each row's digest is xxHash3 of its values, seeded with the posterior's identity)
    full = store.read_rows(LOG, 0, rows)[:, :N_PARAMS]
    seed = row_seed(identity_seed(post.meta["id"]), 0)
    t0 = time.perf_counter()
    for values in full:
        digest(values, seed)
    t_verify = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(100):
        digest(full[0], seed)
    t_stamp = (time.perf_counter() - t0) / 100
    post.close()
    store.close()
    shutil.rmtree(directory)
    mb = rows * N_PARAMS * 4 / 1e6
    return {
        "log_MB": mb,
        "read_s": t_read,
        "dd_read_log_s": t_dd,
        "sample30_s": t_s30,
        "sample1x30_s": t_s1x30,
        "sample30_over_read": t_s30 / t_read,
        "sample30_over_dd_read": t_s30 / t_dd,
        "sample1x30_over_sample30": t_s1x30 / t_s30,
        "verify_log_s": t_verify,
        "verify_over_sample30": t_verify / t_s30,
        "verify_over_read": t_verify / t_read,
        "stamp_row_ms": t_stamp * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "dir",
        nargs="?",
        default=None,
        help="directory on the device to measure (default: a temp dir)",
    )
    ap.add_argument("--updates", type=int, default=500, help="timed updates per round")
    ap.add_argument(
        "--rounds", type=int, default=5, help="rounds of dd + each K (medians of per-round ratios)"
    )
    ap.add_argument(
        "--rows", type=int, default=300, help="rows in the log for the sampling benchmark"
    )
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="nvmlib-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    thetas = rng.standard_normal((8, N_PARAMS)).astype(np.float32)

    cases = {"K100": (100, False), "K10000": (10_000, True), "K10000_first_lap": (10_000, False)}
    row_mb = N_PARAMS * 4 / 1e6
    rounds = []
    for _ in tqdm(
        range(args.rounds), desc="update rounds"
    ):  # each round's ratios use its own dd figures
        r = dd_bandwidth(base, 1024)
        for name, (k, lapped) in cases.items():
            r[f"update_ms_{name}"] = (
                time_updates(base / name, k, thetas, args.updates, lapped) * 1e3
            )
        r["K10000_over_K100"] = r["update_ms_K10000"] / r["update_ms_K100"]
        r["K10000_first_lap_over_K100"] = r["update_ms_K10000_first_lap"] / r["update_ms_K100"]
        r["append_MBps"] = row_mb / r["update_ms_K100"] * 1e3
        r["append_over_dd_write"] = r["append_MBps"] / r["dd_write_over_MBps"]
        r["first_lap_append_over_dd_write_fresh"] = (
            row_mb / r["update_ms_K10000_first_lap"] * 1e3 / r["dd_write_fresh_MBps"]
        )
        rounds.append(r)
    res = {
        "n_params": N_PARAMS,
        "row_MB": row_mb,
        "checkpoint_every": CHECKPOINT_EVERY,
        **{key: float(np.median([r[key] for r in rounds])) for key in rounds[0]},
    }
    res.update(bench_sampling(base / "sample", thetas, args.rows))
    res["stamp_over_update_K100"] = res["stamp_row_ms"] / res["update_ms_K100"]
    for key, value in res.items():
        print(f"{key:28s} {value:12.4f}")
    checks = {
        "update cost K=10,000 within 1.15x of K=100 (both on written blocks)": res[
            "K10000_over_K100"
        ]
        <= 1.15,
        "append >= 80% of dd overwrite bandwidth": res["append_over_dd_write"] >= 0.8,
        "first-lap append >= 80% of dd fresh-write bandwidth": res[
            "first_lap_append_over_dd_write_fresh"
        ]
        >= 0.8,
        "sample(30) <= 1.5x one sequential read": res["sample30_over_read"] <= 1.5,
        "sample(30) <= 1.5x a dd iflag=direct read of the log": res["sample30_over_dd_read"] <= 1.5,
        "30 x sample(1) >= 10x sample(30)": res["sample1x30_over_sample30"] >= 10,
        "row checksum <= 5% of an update": res["stamp_over_update_K100"] <= 0.05,
        "verifying the log <= 5% of sample(30)": res["verify_over_sample30"] <= 0.05,
        "verifying the log <= 5% of a cold sequential read": res["verify_over_read"] <= 0.05,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "checks": checks}, indent=2))
    if args.dir is None:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
