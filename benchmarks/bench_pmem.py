"""pmem or pymm tier append throughput against the mmap tier, same directory, same run.

Appends `--appends` rows of model_2fc's 795,010 float32 parameters (one row per update, as
the posterior log does), then persists; prints each tier's MB/s and time per update, the
tier/mmap time ratio (pmem target: within 1.2x) and the directory's sequential write limit from
`nvmlib probe`. The create time is printed apart: on persistent memory (or PMEM_IS_PMEM_FORCE=1)
the pmem tier faults the array's pages in when it creates it, so appends take no page faults.
`--tier pymm` measures IBM PyMM (hstore-cc shelves in the same directory) instead of pmem.
Usage: python benchmarks/bench_pmem.py [DIR] [--tier pmem|pymm] [--appends 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nvmlib.backends import open_store
from nvmlib.backends.base import ALIGN, aligned_empty, padded_len
from nvmlib.paper.probe import sequential_bandwidth

N_PARAMS = 795_010


def append_seconds(kind: str, path: Path, appends: int) -> tuple[float, float]:
    """(create, append + persist) seconds of a log of `appends` rows on tier `kind`."""
    options = (
        {"size_mb": 2 * appends * N_PARAMS * 4 // 2**20 + 64} if kind == "pymm" else {}
    )  # half a shelf is usable
    store = open_store(kind, path, **options)
    width = padded_len(N_PARAMS, "float32", ALIGN)  # rows as the posterior log lays them out
    rows = aligned_empty((8, width), np.float32)
    rows[:] = np.random.default_rng(0).standard_normal((8, width))
    t0 = time.perf_counter()
    store.create("log", (appends, width), "float32")
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(appends):
        store.write_rows("log", i, rows[i % len(rows)][None])
    store.persist("log")
    seconds = time.perf_counter() - t0
    store.close()
    shutil.rmtree(path)
    return created, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=tempfile.gettempdir())
    parser.add_argument(
        "--tier", choices=("pmem", "pymm"), default="pmem", help="the tier to set against mmap"
    )
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nvmlib-bench-", dir=args.dir))
    mb = args.appends * N_PARAMS * 4 / 1e6
    try:
        # rounds alternate which tier goes first, so both see the same device weather
        tiers = ("mmap", args.tier)
        runs = [
            {
                kind: append_seconds(kind, root / f"{kind}{r}", args.appends)
                for kind in (tiers if r % 2 == 0 else tiers[::-1])
            }
            for r in range(args.repeats)
        ]
        limit = sequential_bandwidth(root, 512 << 20)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {kind: min(run[kind][1] for run in runs) for kind in tiers}
    ratio = float(np.median([run[args.tier][1] / run["mmap"][1] for run in runs]))
    for kind, s in best.items():
        create = np.median([run[kind][0] for run in runs])
        print(
            f"{kind:5} {args.appends} appends of {N_PARAMS} float32 + persist: "
            f"best {s:.3f} s, {mb / s:.0f} MB/s, "
            f"{1e3 * s / args.appends:.2f} ms per update (create: {create:.3f} s)"
        )
    print(
        f"limit of {args.dir}: sequential write {limit['write_MBps']:.0f} MB/s "
        f"({'O_DIRECT' if limit['direct'] else 'buffered + fdatasync'})"
    )
    target = " (target <= 1.2)" if args.tier == "pmem" else ""
    print(f"{args.tier} / mmap time ratio, median of {args.repeats} rounds: {ratio:.2f}{target}")


if __name__ == "__main__":
    main()
