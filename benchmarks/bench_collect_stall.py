"""Does a checkpoint stall training? nvmlib.SWAG on ResNet-18 (11,173,962 parameters), collect()
after every SGD step, default settings (max_rank=20, checkpoint every 10 updates) on the mmap tier.

Trains on random CIFAR-size batches (no data needed) and times each collect() and each step
without it. Reports the median and slowest collect (with and without the first, which writes the
shift, the first iterate, and meets cold pages) and their ratio, which issue 20 asks to be at most
3x; the collects that took a checkpoint; and, in the same run, dd's O_DIRECT write bandwidth
through the posterior's directory (the device behind the numbers).
Usage: python benchmarks/bench_collect_stall.py [DIR] [--steps 40] [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nvmlib import SWAG
from nvmlib.paper.any_model import resnet18


def dd_write(directory: Path, mbytes: int = 1024) -> float:
    """MB/s of `dd oflag=direct` writing `mbytes` into `directory`."""
    target = directory / "dd.bench"
    run = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={mbytes // 16}", "oflag=direct"],
        capture_output=True,
        text=True,
        check=True,
    )
    target.unlink()
    return mbytes * 2**20 / 1e6 / float(re.search(r"copied, ([\d.]+) s", run.stderr).group(1))


def run(directory: Path, steps: int, batch: int) -> dict:
    """Train `steps` steps, collecting after each; the timings in ms."""
    torch.manual_seed(0)
    model = resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    swag = SWAG(model, "mmap", directory / "posterior")
    collect, step, checkpoints = [], [], []
    for t in range(steps):
        a = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        b = time.perf_counter()
        if swag.collect():
            checkpoints.append(t)
        c = time.perf_counter()
        step.append((b - a) * 1e3)
        collect.append((c - b) * 1e3)
    a = time.perf_counter()
    swag.close()
    close = (time.perf_counter() - a) * 1e3
    rest = collect[1:]
    return {
        "steps": steps,
        "batch": batch,
        "n_params": sum(p.numel() for p in model.parameters()),
        "collect_ms": [round(v, 1) for v in collect],
        "checkpoint_steps": checkpoints,
        "step_median_ms": float(np.median(step)),
        "collect_median_ms": float(np.median(collect)),
        "collect_max_ms": max(collect),
        "collect_max_after_first_ms": max(rest),
        "max_over_median": max(collect) / float(np.median(collect)),
        "max_over_median_after_first": max(rest) / float(np.median(rest)),
        "close_ms": close,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dir", nargs="?", help="a directory on the device to measure (default: a temp dir)"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="nvmlib-stall-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        result = {"dd_write_MBps": dd_write(directory), **run(directory, args.steps, args.batch)}
        result["dd_write_MBps_after"] = dd_write(directory)
    finally:
        shutil.rmtree(directory / "posterior", ignore_errors=True)
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    r = result
    print(
        f"ResNet-18 ({r['n_params']:,} parameters), batch {args.batch}, {args.steps} steps, "
        f"mmap tier; dd write {r['dd_write_MBps']:.0f} / {r['dd_write_MBps_after']:.0f} "
        "MB/s (before / after)"
    )
    print(f"step (no collect): median {r['step_median_ms']:.0f} ms")
    print(
        f"collect: median {r['collect_median_ms']:.1f} ms, max {r['collect_max_ms']:.0f} ms "
        f"({r['max_over_median']:.1f}x); after the first: max "
        f"{r['collect_max_after_first_ms']:.0f} ms ({r['max_over_median_after_first']:.1f}x)"
    )
    print(f"checkpoints at steps {result['checkpoint_steps']}; close {result['close_ms']:.0f} ms")
    print("collects (ms):", result["collect_ms"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
