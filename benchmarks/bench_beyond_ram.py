"""A posterior larger than RAM: ResNet-18 (11.2 M parameters) on the mmap tier, collected with
`swag.collect()` until the log holds at least `--ram-multiple` × this machine's RAM, then
`swag.sample(S)` alone and `swag.predict` (S models, BatchNorm refreshed for each), each one
streamed pass over it.

Training is kept off the critical path (each step adds a fixed small vector to the parameters),
so the collection rate is the posterior path's own, compared with `dd oflag=direct` and the
read pass with `dd iflag=direct`, both measured in the same run on the same directory. Peak RSS
(getrusage) is reported beside the model's own footprint: weights, one batch and the S sampled
vectors that `predict` holds. Needs (RAM × multiple + 3 GB) free on DIR; the log is removed at the
end.

Usage: python benchmarks/bench_beyond_ram.py DIR [--ram-multiple 2] [-S 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from bench_swag import dd, dd_bandwidth, write_json
from tqdm import tqdm

from nvmlib import SWAG
from nvmlib.paper.any_model import resnet18
from nvmlib.paper.train import machine_facts
from nvmlib.posterior.log import LOG


def mem_total() -> int:
    """Bytes of RAM (MemTotal in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def peak_rss() -> int:
    """Peak resident set of this process so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "dir", help="a directory on the device under test (needs RAM × multiple + 3 GB free)"
    )
    p.add_argument("--ram-multiple", type=float, default=2.0)
    p.add_argument("-S", dest="samples", type=int, default=8)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(2)
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = resnet18()
    n = sum(q.numel() for q in model.parameters())
    ram = mem_total()
    rows = int(np.ceil(args.ram_multiple * ram / (4 * n)))
    need = rows * 4 * n + (3 << 30)
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(
            f"bench_beyond_ram: {base} has {free / 1e9:.1f} GB free "
            f"but {rows} iterates of ResNet-18 "
            f"({args.ram_multiple} × RAM) need {need / 1e9:.1f} GB: choose a larger directory "
            "or a smaller --ram-multiple"
        )
    bw = dd_bandwidth(base, 2048)
    x = torch.randn(64, 3, 32, 32)
    step = [torch.randn_like(q) * 1e-4 for q in model.parameters()]
    footprint = (
        4 * n + x.numel() * 4 + args.samples * 4 * n
    )  # weights, one batch, S sampled vectors
    rss_before = peak_rss()

    swag = SWAG(
        model,
        "mmap",
        base / "posterior",
        max_rank=None,
        capacity=rows,
        checkpoint_every=100,
        overwrite=True,
    )
    try:
        t = time.perf_counter()
        for _ in tqdm(
            range(rows), desc=f"collecting {rows} × {4 * n / 1e6:.1f} MB", unit="iterate"
        ):
            with torch.no_grad():
                for q, d in zip(model.parameters(), step, strict=True):
                    q.add_(d)
            swag.collect()
        swag.flush()
        collect_s = time.perf_counter() - t
        log_bytes = swag.posterior.store.nbytes(LOG)
        rss_collect = peak_rss()
        log_file = next((base / "posterior").glob(f"{LOG}*"))
        dd_read_s = dd(f"if={log_file}", "of=/dev/null", "iflag=direct")

        t = time.perf_counter()
        swag.sample(args.samples, seed=0)  # the streamed pass alone
        sample_s = time.perf_counter() - t
        t = time.perf_counter()
        probs = swag.predict(
            x, S=args.samples, bn_loader=x, seed=0
        )  # the pass + S BatchNorm refreshes
        predict_s = time.perf_counter() - t
        assert probs.shape == (64, 10) and np.allclose(probs.sum(1), 1)
    finally:
        swag.close()
        shutil.rmtree(base / "posterior", ignore_errors=True)
    rss = peak_rss()
    collect_MBps = rows * 4 * n / collect_s / 1e6
    report = {
        "model": "resnet18",
        "n_params": n,
        "iterates": rows,
        "log_bytes": log_bytes,
        "ram_bytes": ram,
        "log_vs_ram": log_bytes / ram,
        "samples": args.samples,
        "dd": bw,
        "collect_s": collect_s,
        "collect_MBps": collect_MBps,
        "collect_vs_dd_write": collect_MBps / bw["dd_write_fresh_MBps"],
        "sample_s": sample_s,
        "predict_s": predict_s,
        "dd_read_log_s": dd_read_s,
        "sample_MBps": log_bytes / sample_s / 1e6,
        "sample_vs_dd_read": sample_s / dd_read_s,
        "peak_rss_bytes": rss,
        "peak_rss_collect_bytes": rss_collect,
        "rss_before_bytes": rss_before,
        "model_footprint_bytes": footprint,
        "rss_above_footprint_bytes": rss - footprint,
        "machine": machine_facts(torch.device("cpu")),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(
        f"log {log_bytes / 1e9:.1f} GB = {report['log_vs_ram']:.2f} × RAM "
        f"({ram / 1e9:.1f} GB), {rows} iterates"
    )
    print(
        f"collect: {collect_MBps:.0f} MB/s = {report['collect_vs_dd_write']:.2f} × dd oflag=direct "
        f"({bw['dd_write_fresh_MBps']:.0f} MB/s)"
    )
    print(
        f"sample S={args.samples}: {sample_s:.1f} s = "
        f"{report['sample_vs_dd_read']:.2f} × dd iflag=direct of the log ({dd_read_s:.1f} s); "
        f"predict (sampling + BatchNorm + forward): {predict_s:.1f} s"
    )
    print(
        f"peak RSS {rss / 1e9:.2f} GB; model footprint {footprint / 1e9:.2f} GB; "
        f"above it {(rss - footprint) / 1e9:.2f} GB (interpreter and libraries included)"
    )
    write_json(args.json, report)


if __name__ == "__main__":
    main()
