"""The host's per-update cost: `SWAGPosterior.update()` of one row against a memcpy of that row.

For each row size (model_4fc's 2,797,010 parameters and an 11 M-parameter, ResNet-18-sized row)
and tier (dram; mmap in DIR), a posterior (float32, max_rank=64) takes `--updates` updates per
round, the rounds of every case interleaved with a memcpy of the same row (np.copyto, the median
of `--copies`) so that a busy machine weighs on both alike. An update's time is the wall time of
a round's updates (the last row settled) over their number, counting the moments' batches where
they land; the calls that wrote a checkpoint are left out (their cost is the checkpoint's, not
the row's). Reported: the median over rounds of both, their ratio, the median single call, and
numba's threading layer and threads.

Usage: python benchmarks/bench_update.py [DIR] [--rounds 5] [--updates 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
from bench_swag import write_json

from nvmlib import SWAGPosterior, open_store
from nvmlib.posterior import moments
from nvmlib.posterior.log import staged_rows

SIZES = {"model_4fc": 2_797_010, "resnet18_11M": 11_173_962}
MAX_RANK = 64


def memcpy_ms(src: np.ndarray, dst: np.ndarray, copies: int) -> float:
    """Median ms of np.copyto(dst, src)."""
    times = []
    for _ in range(copies):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def updates_ms(post: SWAGPosterior, thetas: np.ndarray, updates: int) -> tuple[float, float]:
    """(ms per update over the round's non-checkpoint calls with the last row settled, median ms
    of one such call)."""
    calls, total = [], 0.0
    for i in range(updates):
        t = time.perf_counter()
        checkpointed = post.update(thetas[i % len(thetas)])
        if i + 1 == updates:
            _ = post.n_collected  # waits: settles the last row
        dt = time.perf_counter() - t
        if not checkpointed:
            calls.append(dt)
            total += dt
    return total / len(calls) * 1e3, float(np.median(calls)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", help="directory for the mmap tier (default: a temporary one)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--updates", type=int, default=48, help="updates per round and case")
    p.add_argument("--copies", type=int, default=9, help="memcpys per round and case")
    p.add_argument("--tiers", default="dram,mmap")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_update_"))
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cases = {}
    try:
        for name, n in SIZES.items():
            theta = rng.standard_normal(n).astype(np.float32)
            thetas = np.stack([theta + np.float32(1e-4 * k) for k in range(4)])
            for tier in args.tiers.split(","):
                store = open_store(tier, base / f"{name}-{tier}" if tier != "dram" else None)
                post = SWAGPosterior.create(store, n, max_rank=MAX_RANK, overwrite=True)
                updates_ms(post, thetas, 2 * staged_rows(n, "float32"))  # warm-up: pages, kernels
                cases[(name, tier)] = {
                    "post": post,
                    "thetas": thetas,
                    "dst": np.empty_like(theta),
                    "update_ms": [],
                    "call_ms": [],
                    "memcpy_ms": [],
                }
        for _ in range(args.rounds):
            for case in cases.values():
                case["memcpy_ms"].append(memcpy_ms(case["thetas"][0], case["dst"], args.copies))
                per, call = updates_ms(case["post"], case["thetas"], args.updates)
                case["update_ms"].append(per)
                case["call_ms"].append(call)
        report: dict = {
            "threading_layer": numba.threading_layer() if moments.THREADS > 1 else "serial",
            "threads": moments.THREADS,
            "rounds": args.rounds,
            "updates_per_round": args.updates,
            "cases": [],
        }
        for (name, tier), case in cases.items():
            case["post"].close()
            up, cp = float(np.median(case["update_ms"])), float(np.median(case["memcpy_ms"]))
            row = {
                "row": name,
                "n_params": SIZES[name],
                "tier": tier,
                "staged_rows": staged_rows(SIZES[name], "float32"),
                "update_ms": up,
                "memcpy_ms": cp,
                "update_vs_memcpy": up / cp,
                "call_ms_median": float(np.median(case["call_ms"])),
                "update_ms_rounds": case["update_ms"],
                "memcpy_ms_rounds": case["memcpy_ms"],
            }
            report["cases"].append(row)
            print(
                f"{name:>13} {tier:>5}: update {up:6.2f} ms, memcpy {cp:5.2f} ms = "
                f"{up / cp:4.2f}x (median call {row['call_ms_median']:.2f} ms)"
            )
        print(f"numba {report['threading_layer']} layer, {report['threads']} threads")
        write_json(args.json, report)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
