"""Drawing 30 models: nvmlib against torch-uncertainty's SWAG on the same posterior.

ResNet-18 (11,173,962 parameters) takes K = 20 iterates, each the one before plus seeded noise.
nvmlib collects them into an mmap posterior (deviations="running", as torch-uncertainty centres
them); torch-uncertainty's `SWAG` (methods/swag.py, max_num_models=20) takes the same iterates
through `update_wrapper`. Then each draws S = 30 models (`list(SWAG.sample_models(30,
update_bn=False))` against `[swag.sample(0.5) for _ in range(30)]`). Every round runs each side in
a fresh child process, the two alternating, and reports the wall time of the draws and the child's
peak RSS. torch-uncertainty's package __init__ imports torchvision (for plotting), which this
machine lacks, so its two plain-torch modules (swa.py, swag.py) are loaded from where it is
installed: `pip install -c constraints.txt torch-uncertainty` into any environment and pass its
site-packages with --peer-site (default: this interpreter's).

Usage: python benchmarks/bench_draws_peer.py [--peer-site DIR] [--rounds 3] [-S 30] [--json out]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
from bench_swag import write_json

ITERATES = """
import resource, sys, time
import torch
from nvmlib.paper.any_model import resnet18

def iterates(model, K):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(K):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
            yield

def report(seconds):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(seconds, peak)

torch.manual_seed(0)
model = resnet18()
S, K, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
"""

OURS = (
    ITERATES
    + """
from nvmlib import SWAG
swag = SWAG(model, "mmap", where, max_rank=K, deviations="running")
for _ in iterates(model, K):
    swag.collect()
swag.flush()
start = time.perf_counter()
models = list(swag.sample_models(S, update_bn=False, seed=0))
report(time.perf_counter() - start)
"""
)

PEER = (
    ITERATES
    + """
import importlib.util, types
methods = where + "/torch_uncertainty/methods/"
package = types.ModuleType("peer")
package.__path__ = [methods]
sys.modules["peer"] = package
for name in ("swa", "swag"):
    spec = importlib.util.spec_from_file_location("peer." + name, methods + name + ".py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
swag = sys.modules["peer.swag"].SWAG(
    model, cycle_start=0, cycle_length=1, scale=0.5, max_num_models=K, num_estimators=1
)
for t, _ in enumerate(iterates(model, K)):
    swag.update_wrapper(t + 1)
start = time.perf_counter()
models = [swag.sample(0.5) for _ in range(S)]
report(time.perf_counter() - start)
"""
)


def run(code: str, S: int, K: int, where: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one child."""
    done = subprocess.run(
        [sys.executable, "-c", code, str(S), str(K), where], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    seconds, peak = done.stdout.split()[-2:]
    return float(seconds), int(peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-site", default=sysconfig.get_paths()["purelib"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-S", type=int, default=30)
    p.add_argument("-K", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    if not (Path(args.peer_site) / "torch_uncertainty" / "methods" / "swag.py").is_file():
        raise SystemExit(
            f"bench_draws_peer: no torch_uncertainty under {args.peer_site}: pip install -c "
            "constraints.txt torch-uncertainty (in any environment) and pass its site-packages "
            "with --peer-site"
        )
    figures: dict[str, list[tuple[float, int]]] = {"nvmlib": [], "torch-uncertainty": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="nvmlib-draws-") as tmp:
            figures["nvmlib"].append(run(OURS, args.S, args.K, tmp + "/post"))
        figures["torch-uncertainty"].append(run(PEER, args.S, args.K, args.peer_site))
    report = {
        side: {
            "seconds": [s for s, _ in runs],
            "median_s": float(np.median([s for s, _ in runs])),
            "peak_rss_bytes": [m for _, m in runs],
        }
        for side, runs in figures.items()
    }
    ours, peer = report["nvmlib"]["median_s"], report["torch-uncertainty"]["median_s"]
    report["S"], report["K"], report["ours_vs_peer"] = args.S, args.K, ours / peer
    print(json.dumps(report, indent=2))
    print(
        f"{args.S} draws: nvmlib {ours:.2f} s, torch-uncertainty {peer:.2f} s ({ours / peer:.2f}x)"
    )
    write_json(args.json, report)


if __name__ == "__main__":
    main()
