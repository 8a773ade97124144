"""Peak memory of sampling a big posterior: sample(S, out=<mmap store>) streams over parameter
blocks, so its memory does not grow with S × n_params (issue #20: <= 2 GB for S = 30 of a 30 M
parameter posterior with K = 8, against 8.9 GB when both z₁ and D·z₂ were (S, n) in memory).

Builds the posterior on the mmap tier in DIR (a child process), then samples it in a fresh child
process per case, each reporting its own peak RSS (resource.getrusage(RUSAGE_SELF).ru_maxrss,
nothing subtracted) and wall time; dd of the log file (iflag=direct) in the same run gives the
device's read speed for comparison.
Usage: python benchmarks/bench_sample_memory.py [DIR] [--params 30000000] [--K 8] [--S 30]
       [--in-memory] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD = """
import numpy as np, sys
from nvmlib import SWAGPosterior, open_store
n, K = int(sys.argv[2]), int(sys.argv[3])
post = SWAGPosterior.create(open_store("mmap", sys.argv[1]), n, max_rank=K, checkpoint_every=K)
rng = np.random.default_rng(0)
theta = rng.standard_normal(n, dtype=np.float32)
for t in range(K + 2):
    theta += 1e-3 * rng.standard_normal(n, dtype=np.float32)
    post.update(theta)
post.close()
"""

SAMPLE = """
import json, resource, sys, time
import numpy as np
from nvmlib import SWAGPosterior, open_store
root, S, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
post = SWAGPosterior.open(open_store("mmap", root + "/post", readonly=True), readonly=True)
start = time.perf_counter()
if mode == "out":
    draws = post.sample(S, seed=1, out=open_store("mmap", root + "/draws"))
    check = float(np.abs(draws[S - 1]).sum())
else:
    check = float(np.abs(post.sample(S, seed=1)[S - 1]).sum())
seconds = time.perf_counter() - start
print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
       "seconds": seconds, "check": check}))
"""


def child(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return (done.stdout.strip().splitlines() or [""])[-1]


def dd_read(file: Path) -> float:
    """GB/s of one direct sequential read of `file`."""
    done = subprocess.run(
        ["dd", f"if={file}", "of=/dev/null", "bs=16M", "iflag=direct"],
        capture_output=True,
        text=True,
    )
    seconds = float(re.findall(r"([\d.]+) s,", done.stderr)[-1])
    return file.stat().st_size / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--params", type=int, default=30_000_000)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--S", type=int, default=30)
    ap.add_argument("--in-memory", action="store_true", help="also time sample(S) without out=")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="nvmlib-sample-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        child(BUILD, str(root / "post"), str(args.params), str(args.K))
        result = {
            "params": args.params,
            "K": args.K,
            "S": args.S,
            "build_seconds": time.perf_counter() - t0,
            "row_gb": args.params * 4 / 1e9,
            "draws_gb": args.S * args.params * 4 / 1e9,
            "dd_read_gbps": dd_read(root / "post" / "swag.log.npy"),
        }
        result["out"] = json.loads(child(SAMPLE, str(root), str(args.S), "out"))
        if args.in_memory:
            result["in_memory"] = json.loads(child(SAMPLE, str(root), str(args.S), "memory"))
        log_gb = (root / "post" / "swag.log.npy").stat().st_size / 1e9
        result["out"]["log_read_gbps"] = log_gb / result["out"]["seconds"]
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
