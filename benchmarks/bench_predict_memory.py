"""Peak memory of SWAG.predict(S=30) of a >= 100 M-parameter model (issue #20: <= model +
optimizer + 2 GB): the S draws (12 GB here) exceed the default memory_budget, so they go to a
scratch store beside the posterior and the models are loaded one draw at a time.

One child process: a plain MLP (6 × Linear(4096, 4096), 100.7 M parameters) trained with SGD +
momentum for K + 2 steps on random data, collected into an mmap posterior (K = 8) in DIR with
moments="store" (the float64 sums on the tier: host moments alone would take 40 bytes a
parameter, 4 GB), then predict(S) on a small batch. It reports ru_maxrss (nothing subtracted)
before and after predict, and the model's and optimizer's bytes.
Usage: python benchmarks/bench_predict_memory.py [DIR] [--S 30] [--K 8] [--moments store]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from nvmlib import SWAG
root, S, K, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
torch.manual_seed(0)
layers = [m for _ in range(6) for m in (torch.nn.Linear(4096, 4096), torch.nn.ReLU())]
model = torch.nn.Sequential(*layers)
n = sum(p.numel() for p in model.parameters())
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
x = torch.randn(64, 4096)
swag = SWAG(model, "mmap", root + "/post", max_rank=K, checkpoint_every=K, moments=kind)
for _ in range(K + 2):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    swag.collect()
swag.flush()
opt.zero_grad(set_to_none=True)
before = peak()
start = time.perf_counter()
probs = swag.predict([x[:16]], S=S, seed=1)
seconds = time.perf_counter() - start
print(json.dumps({"params": n, "model_gb": n * 4 / 1e9, "optimizer_gb": n * 4 / 1e9,
                  "moments": type(swag.posterior._moments).__name__,
                  "host_moments_gb": n * 40 / 1e9, "draws_gb": S * n * 4 / 1e9,
                  "peak_before_predict_gb": before, "peak_gb": peak(), "predict_seconds": seconds,
                  "finite": bool(torch.isfinite(torch.from_numpy(probs)).all())}))
swag.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--S", type=int, default=30)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--moments", default="store", help="store, host or auto (SWAG's moments=)")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="nvmlib-predict-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), str(args.S), str(args.K), args.moments],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
