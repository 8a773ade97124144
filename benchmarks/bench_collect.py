"""Cost of `swag.collect()` per training step of ResNet-18 (11.2 M parameters) on every tier.

For each tier, rounds alternate a block of training steps without collection and a block with
`collect()` after every step (the iterate of every minibatch, as in the paper); the medians of
the blocks' seconds per step are compared. Each tier's write bandwidth is measured in the same
run (`dd oflag=direct` under the file tiers, a numpy copy for DRAM), so the report also gives
the bound max(train-only step, bytes per step / write bandwidth) that collection cannot beat.
On a GPU (-c 0) blocks are timed to torch.cuda.synchronize() with every queued iterate recorded.

Usage: python benchmarks/bench_collect.py [DIR] [-c GPU] [--batch 32] [--steps 4] [--rounds 3]
                                          [--tiers dram,mmap,pmem,zarr] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_swag import dd_bandwidth, write_json
from torch import nn
from tqdm import tqdm

from nvmlib import SWAG
from nvmlib.backends import available_tiers
from nvmlib.paper.any_model import resnet18
from nvmlib.paper.train import machine_facts, resolve_device


def dram_bandwidth(nbytes: int) -> float:
    """MB/s of copying `nbytes` between two DRAM buffers (the dram tier's write limit)."""
    src, dst = np.ones(nbytes // 4, np.float32), np.zeros(nbytes // 4, np.float32)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    return 5 * nbytes / (time.perf_counter() - t) / 1e6


def steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    count: int,
    swag: SWAG | None,
) -> float:
    """Seconds per step of `count` SGD steps, collecting after each when `swag` is given."""
    t = time.perf_counter()
    for _ in range(count):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if swag is not None:
            swag.collect()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    if swag is not None:
        _ = swag.n_collected  # waits until every queued iterate is recorded
    return (time.perf_counter() - t) / count


def bench_tier(
    tier: str, where: Path | None, device: torch.device, batch: int, count: int, rounds: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = resnet18().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = (
        torch.randn(batch, 3, 32, 32, device=device),
        torch.randint(0, 10, (batch,), device=device),
    )
    swag = SWAG(model, tier, where, max_rank=2 * count + 2, checkpoint_every=100)
    try:
        steps(model, opt, x, y, 2, swag)  # warm-up: allocations, numba, first rows
        train, collect = [], []
        for _ in range(rounds):
            train.append(steps(model, opt, x, y, count, None))
            collect.append(steps(model, opt, x, y, count, swag))
    finally:
        swag.close()
    return {
        "train_step_s": float(np.median(train)),
        "collect_step_s": float(np.median(collect)),
        "train_rounds_s": train,
        "collect_rounds_s": collect,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "dir", nargs="?", help="directory on the device to measure (default: a temporary one)"
    )
    p.add_argument("-c", dest="gpu", type=int, default=-1, help="CUDA device id (-1: CPU)")
    p.add_argument(
        "--batch", type=int, default=None, help="minibatch (default 32 on CPU, 128 on GPU)"
    )
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiers", default="dram,mmap,pmem,zarr")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    device = resolve_device(args.gpu)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_collect-"))
    base.mkdir(parents=True, exist_ok=True)
    row_bytes = 4 * sum(p.numel() for p in resnet18().parameters())
    status = available_tiers()
    tiers = [t for t in args.tiers.split(",") if status.get(t) == "ok"]
    results: dict[str, Any] = {}
    for tier in tqdm(tiers, desc="tiers", unit="tier"):
        where = None if tier == "dram" else base / tier
        limit = (
            dram_bandwidth(row_bytes)
            if tier == "dram"
            else dd_bandwidth(base, 1024)["dd_write_fresh_MBps"]
        )
        r = bench_tier(tier, where, device, batch, args.steps, args.rounds)
        bound = max(r["train_step_s"], row_bytes / (limit * 1e6))
        results[tier] = {
            **r,
            "write_MBps": limit,
            "bytes_per_step": row_bytes,
            "overhead": r["collect_step_s"] / r["train_step_s"],
            "vs_bound": r["collect_step_s"] / bound,
            "tier_faster_than_step": row_bytes / (limit * 1e6) < r["train_step_s"],
        }
    report = {
        "model": "resnet18",
        "n_params": row_bytes // 4,
        "batch": batch,
        "device": str(device),
        "machine": machine_facts(device),
        "tiers": results,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"ResNet-18, {row_bytes / 1e6:.1f} MB per iterate, batch {batch} on {device}")
    print(
        f"{'tier':6} {'train ms':>9} {'+collect ms':>12} {'overhead':>9} "
        f"{'write MB/s':>11} {'vs bound':>9}"
    )
    for tier, r in results.items():
        print(
            f"{tier:6} {r['train_step_s'] * 1e3:9.1f} {r['collect_step_s'] * 1e3:12.1f} "
            f"{r['overhead']:8.3f}x "
            f"{r['write_MBps']:11.0f} {r['vs_bound']:8.3f}x"
        )
    write_json(args.json, report)


if __name__ == "__main__":
    main()
