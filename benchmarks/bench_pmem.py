"""pmem tier append throughput against the mmap tier, same directory, same run.

Appends `--appends` rows of model_2fc's 795,010 float32 parameters (one row per update, as
the posterior log does), then persists; prints each tier's MB/s, the pmem/mmap time ratio
(target: within 1.2x) and the directory's sequential write limit from `nvmlib probe`.
Usage: python benchmarks/bench_pmem.py [DIR] [--appends 300] [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nvmlib.backends import open_store
from nvmlib.probe import sequential_bandwidth

N_PARAMS = 795_010


def append_seconds(kind: str, path: Path, appends: int) -> float:
    """Seconds to create a log of `appends` rows on tier `kind`, append every row, and persist."""
    rows = np.random.default_rng(0).standard_normal((8, N_PARAMS)).astype(np.float32)
    store = open_store(kind, path)
    store.create("log", (appends, N_PARAMS), "float32")
    t0 = time.perf_counter()
    for i in range(appends):
        store.write_rows("log", i, rows[i % len(rows)][None])
    store.persist("log")
    seconds = time.perf_counter() - t0
    store.close()
    shutil.rmtree(path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=tempfile.gettempdir())
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nvmlib-bench-", dir=args.dir))
    mb = args.appends * N_PARAMS * 4 / 1e6
    try:
        best = {kind: min(append_seconds(kind, root / f"{kind}{r}", args.appends) for r in range(args.repeats))
                for kind in ("mmap", "pmem")}
        limit = sequential_bandwidth(root, 512 << 20)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for kind, s in best.items():
        print(f"{kind:5} {args.appends} appends of {N_PARAMS} float32 + persist: {s:.3f} s, {mb / s:.0f} MB/s")
    print(f"limit of {args.dir}: sequential write {limit['write_MBps']:.0f} MB/s "
          f"({'O_DIRECT' if limit['direct'] else 'buffered + fdatasync'})")
    print(f"pmem / mmap time ratio: {best['pmem'] / best['mmap']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
