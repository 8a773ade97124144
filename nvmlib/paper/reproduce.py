"""`nvmlib reproduce`: run every notebook through papermill at a scale preset.

Executed copies go to results/<notebook>.ipynb beside the JSON record each notebook writes
(results/<notebook>.json); figures go to figures/ as PNG and PDF; results/reproduce.json
records the scale, how long each notebook took and the peak resident memory of the run (its
kernels included), results/tier_ratios.md the tier ratios (epoch time and, in parentheses, total
time relative to DRAM) as a markdown table.

Before any work the run's peak memory and disk are computed from the preset (nvmlib.paper.resources)
and the run refuses at once when this machine cannot hold them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nvmlib.errors import ConfigError, NotebookError, NvmlibError, ResourceError
from nvmlib.paper import resources
from nvmlib.progress import text_bars

NOTEBOOKS = ("collect", "tier_runtime", "posterior_quality", "sampling", "any_model", "cluster")

# scale -> notebook -> parameters (each overrides the notebook's `parameters` cell)
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {  # seconds: for the tests
        "collect": {
            "model": "model_2conv2fc",
            "tier": "mmap",
            "epochs": 2,
            "max_rank": None,
            "limit": 500,
            "test_limit": 500,
            "samples": 3,
            "probe_bytes": 32 << 20,
        },
        "tier_runtime": {
            "model": "model_2conv2fc",
            "epochs": [1, 2],
            "max_rank": None,
            "limit": 500,
            "tiers": {"dram": ["dram", None], "mmap": ["mmap", None], "pmem": ["pmem", None]},
            "probe_bytes": 32 << 20,
        },
        "posterior_quality": {
            "model": "model_2conv2fc",
            "tier": "mmap",
            "epochs": 1,
            "lr": 0.01,
            "limit": 500,
            "ranks": [2, 4, 6],
            "samples": 3,
            "test_limit": 300,
            "angles": [0, 90, 180],
            "probe_bytes": 32 << 20,
        },
        "sampling": {
            "model": "model_2conv2fc",
            "tier": "mmap",
            "rank": 20,
            "sample_counts": [1, 4],
            "passes_up_to": 4,
            "probe_bytes": 32 << 20,
        },
        "any_model": {
            "limit": 1000,
            "test_limit": 1000,
            "width": 8,
            "epochs": 2,
            "swag_epochs": 2,
            "runs": 2,
            "samples": 4,
            "max_rank": 10,
            "collect_every": 2,
            "probe_bytes": 32 << 20,
        },
        "cluster": {
            "model": "model_2conv2fc",
            "epochs": 1,
            "limit": 500,
            "max_rank": 5,
            "shard_mb": 1,
            "samples": 3,
            "worker_counts": [1],
            "test_limit": 300,
            "angles": [0, 90],
            "probe_bytes": 32 << 20,
        },
    },
    # the whole reproduction on a laptop in under 10 minutes: 2 cores, 8 GB of RAM (peak RSS under
    # 6 GB), 20 GB of disk; model_2fc (one iterate: 3.2 MB), one torch thread per kernel (two stall
    # behind any other work on two cores)
    "default": {
        # collect and tier_runtime train on the first 30,000 MNIST images (300 minibatches an epoch)
        "collect": {
            "model": "model_2fc",
            "tier": "mmap",
            "epochs": 2,
            "max_rank": 100,
            "limit": 30_000,
            "test_limit": 5000,
            "samples": 10,
            "probe_bytes": 128 << 20,
        },
        # each tier keeps the last 300 iterates (a ring: one row written per update as with K = all,
        # 1 GB on the DRAM tier instead of the 3.8 GB of every iterate of 4 epochs)
        "tier_runtime": {
            "model": "model_2fc",
            "epochs": [1, 2, 3, 4],
            "max_rank": 300,
            "limit": 30_000,
            "tiers": {"dram": ["dram", None], "mmap": ["mmap", None], "pmem": ["pmem", None]},
            "probe_bytes": 128 << 20,
        },
        # SWAG as it is meant to be run on all of MNIST: 2 epochs of SGD with momentum, then 2
        # epochs recording every 10th minibatch (121 iterates); the paper's protocol (recording from
        # the first minibatch) is the `paper` preset's
        "posterior_quality": {
            "model": "model_2fc",
            "tier": "mmap",
            "epochs": 4,
            "swag_start": 2,
            "lr": 0.05,
            "momentum": 0.9,
            "record_every": 10,
            "limit": None,
            "ranks": [2, 5, 10, 20, 50, 121],
            "samples": 20,
            "test_limit": 2000,
            "angles": list(range(0, 181, 30)),
            "probe_bytes": 128 << 20,
        },
        "sampling": {
            "model": "model_2fc",
            "tier": "mmap",
            "rank": 200,
            "sample_counts": [1, 2, 4, 8, 16, 32, 64],
            "passes_up_to": 8,
            "probe_bytes": 128 << 20,
        },
        "any_model": {
            "limit": 5000,
            "test_limit": 5000,
            "width": 8,
            "epochs": 6,
            "swag_epochs": 3,
            "runs": 3,
            "samples": 10,
            "max_rank": 20,
            "torch_threads": 1,
            "probe_bytes": 128 << 20,
        },
        "cluster": {
            "model": "model_2fc",
            "epochs": 1,
            "limit": 20_000,
            "max_rank": 100,
            "shard_mb": 32,
            "samples": 10,
            "worker_counts": [1, 2],
            "test_limit": 1000,
            "angles": [0, 90],
            "probe_bytes": 128 << 20,
        },
    },
    # the paper's model, epochs and GPU training (-c 0); set the tier paths to the server's devices
    "paper": {
        "collect": {
            "model": "model_4fc",
            "tier": "mmap",
            "epochs": 75,
            "max_rank": None,
            "limit": None,
            "test_limit": None,
            "samples": 30,
            "gpu": 0,
            "posterior_path": "/mnt/nvme0/nvmlib/nn/collect",
        },
        "tier_runtime": {
            "model": "model_4fc",
            "epochs": [1, 25, 50, 75],
            "max_rank": None,
            "limit": None,
            "gpu": 0,
            "tiers": {
                "dram": ["dram", None],
                "fs-dax": ["pmem", "/mnt/pmem0/nvmlib"],
                "dev-dax": ["pmem", "/dev/dax0.0"],
                "memmap": ["mmap", "/mnt/nvme0/nvmlib"],
            },
        },
        "posterior_quality": {
            "model": "model_4fc",
            "tier": "mmap",
            "epochs": 10,
            "lr": 1e-4,
            "limit": None,
            "gpu": 0,
            "ranks": [10, 100, 1000, 3000, 6001],
            "samples": 30,
            "test_limit": None,
            "angles": list(range(0, 181, 15)),
            "posterior_path": "/mnt/nvme0/nvmlib/quality",
            "replay_tier": "mmap",
            "replay_path": "/mnt/nvme0/nvmlib/replay",
        },
        "sampling": {
            "model": "model_4fc",
            "tier": "mmap",
            "rank": 6000,
            "sample_counts": [1, 2, 4, 8, 16, 32, 64],
            "passes_up_to": 8,
            "posterior_path": "/mnt/nvme0/nvmlib/sampling",
        },
        "any_model": {
            "limit": None,
            "width": 32,
            "epochs": 20,
            "swag_epochs": 10,
            "runs": 5,
            "samples": 30,
            "max_rank": 200,
            "posterior_path": "/mnt/nvme0/nvmlib/paper/any_model",
        },
        "cluster": {
            "model": "model_4fc",
            "epochs": 2,
            "limit": None,
            "max_rank": 1200,
            "shard_mb": 256,
            "samples": 30,
            "worker_counts": [1, 2, 4, 8],
            "test_limit": None,
            "angles": list(range(0, 181, 15)),
        },
    },
}


def parameters(
    scale: str, notebook: str, results_dir: Path, figures_dir: Path, seed: int = 0
) -> dict[str, Any]:
    """The parameters papermill injects into `notebook` at `scale` (paths made absolute)."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    if notebook not in NOTEBOOKS:
        raise ConfigError(f"unknown notebook {notebook!r}; choose from {', '.join(NOTEBOOKS)}")
    return {
        **SCALES[scale][notebook],
        "preset": scale,
        "seed": seed,
        "results_dir": str(results_dir.resolve()),
        "figures_dir": str(figures_dir.resolve()),
        "scratch_dir": str((results_dir / "scratch").resolve()),
    }


def check_kernel(kernel_name: str) -> None:
    """Refuse a kernel that would not run this Python (and so not this nvmlib)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec(kernel_name).argv
    except NoSuchKernel:
        raise ConfigError(
            f"no Jupyter kernel named {kernel_name!r}: run `{sys.executable} -m ipykernel "
            "install --sys-prefix` or pass --kernel NAME"
        ) from None
    # jupyter_client runs a kernel whose argv starts with plain "python" with this interpreter
    same = argv[0] in (
        "python",
        f"python{sys.version_info[0]}",
        f"python{sys.version_info[0]}.{sys.version_info[1]}",
    )
    if not same and Path(argv[0]).resolve() != Path(sys.executable).resolve():
        raise ConfigError(
            f"the Jupyter kernel {kernel_name!r} runs {argv[0]}, not this Python "
            f"({sys.executable}); run `{sys.executable} -m ipykernel install --sys-prefix` or pass "
            "--kernel NAME"
        )


def peak_rss_bytes() -> int:
    """The largest resident set of this process and of its children that ended (the kernels). Linux
    starts a process' peak at the resident set of the one that forked it: run from a shell, this is
    the run's own."""
    kb = max(
        resource.getrusage(who).ru_maxrss
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return kb * 1024  # Linux counts kilobytes


def plan_run(
    scale: str, results_dir: Path, figures_dir: Path, only: list[str] | None = None, seed: int = 0
) -> tuple[dict[str, dict[str, Any]], resources.Plan]:
    """The parameters of each notebook to run and what the run needs at its peak."""
    plan = {
        name: parameters(scale, name, results_dir, figures_dir, seed) for name in only or NOTEBOOKS
    }
    return plan, resources.plan(plan, results_dir / "scratch")


def check_fits(
    scale: str,
    needs: resources.Plan,
    results_dir: Path,
    figures_dir: Path,
    only: list[str] | None = None,
) -> None:
    """ResourceError naming need versus have, and the presets that would fit, when this machine
    cannot hold the run of `scale`."""
    machine = resources.Machine.here()
    short = needs.shortfalls(machine)
    if short:
        fits = [
            s
            for s in SCALES
            if s != scale and not plan_run(s, results_dir, figures_dir, only)[1].shortfalls(machine)
        ]
        hint = f"--scale {' or '.join(fits)} fits here" if fits else "no preset fits here"
        raise ResourceError(
            f"the {scale} preset cannot run on this machine: {'; '.join(short)}. "
            f"Free memory or disk, or run a smaller preset ({hint})"
        )


def reproduce(
    scale: str = "default",
    notebooks_dir: str | Path = "notebooks",
    results_dir: str | Path = "results",
    figures_dir: str | Path = "figures",
    only: list[str] | None = None,
    kernel_name: str = "python3",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Execute the notebooks at `scale`; returns seconds per notebook. Raises ResourceError at once
    when this machine cannot hold the run, ConfigError when a notebook, the kernel or a writable
    results or figures directory is missing, and NotebookError on the first notebook that fails (the
    executed copy shows where)."""
    from nvmlib.paper.train import check_writable

    notebooks_dir, results_dir, figures_dir = (
        Path(notebooks_dir),
        Path(results_dir),
        Path(figures_dir),
    )
    plan, needs = plan_run(scale, results_dir, figures_dir, only, seed)
    check_kernel(kernel_name)
    missing = [f"{name}.ipynb" for name in plan if not (notebooks_dir / f"{name}.ipynb").is_file()]
    if missing:
        raise ConfigError(
            f"{notebooks_dir} has no {', '.join(missing)}: pass --notebooks-dir with the "
            "repository's notebooks/ directory"
        )
    check_writable(results_dir / "reproduce.json", "--results-dir", create=False)
    check_writable(figures_dir / f"{next(iter(plan))}.png", "--figures-dir", create=False)
    check_fits(scale, needs, results_dir, figures_dir, only)
    for directory in (results_dir, figures_dir):  # a refused run creates nothing
        directory.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}
    bar = tqdm(plan, desc=f"reproduce ({scale})", unit="notebook", disable=not progress)
    bar.write(f"the {scale} preset {needs.summary()}")
    start = time.perf_counter()
    for name in bar:
        bar.set_postfix_str(name)
        t = time.perf_counter()
        execute(
            notebooks_dir / f"{name}.ipynb",
            results_dir / f"{name}.ipynb",
            plan[name],
            kernel_name,
            notebooks_dir,
        )
        seconds[name] = time.perf_counter() - t
        peaks[name] = peak_rss_bytes()
        bar.write(
            f"{name}: {seconds[name]:.1f} s -> {results_dir / name}.json, "
            f"{results_dir / name}.ipynb"
        )
    if "tier_runtime" in plan:
        record = json.loads((results_dir / "tier_runtime.json").read_text())
        (results_dir / "tier_ratios.md").write_text(ratio_markdown(record))
    summary = {
        "scale": scale,
        "seconds": seconds,
        "total_s": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_bytes_after": peaks,
        "estimated_bytes": {
            name: {"memory": n.memory, "scratch": n.scratch, "kept": dict(n.kept)}
            for name, n in needs.by_notebook.items()
        },
        "figures": sorted(p.name for p in figures_dir.glob("*.png")),
    }
    (results_dir / "reproduce.json").write_text(json.dumps(summary, indent=2) + "\n")
    return seconds


def execute(
    notebook: Path, output: Path, parameters: dict[str, Any], kernel_name: str, cwd: Path
) -> None:
    """Run `notebook` with `parameters` through papermill into `output`, in `cwd` (NotebookError
    when a cell fails). The kernel talks to papermill over Unix sockets in a private directory
    (jupyter_client's ipc transport), not over unencrypted TCP on localhost (which any local user
    can read, and about which ipykernel warns on the terminal once per notebook)."""
    import papermill as pm
    from traitlets.config import Config

    with tempfile.TemporaryDirectory(prefix="nvmlib-kernel-") as sockets, text_bars():
        # text_bars: the kernels' bars are text, whose last line the executed copy keeps
        config = Config({"KernelManager": {"transport": "ipc", "ip": f"{sockets}/kernel"}})
        try:
            pm.execute_notebook(
                notebook,
                output,
                parameters=parameters,
                kernel_name=kernel_name,
                cwd=str(cwd),
                progress_bar=False,
                coalesce_streams=True,
                config=config,
            )
        except pm.PapermillExecutionError as exc:
            why = (exc.evalue.strip().splitlines() or [""])[0]
            raise NotebookError(
                f"the notebook {notebook} failed in cell {exc.exec_count}: {exc.ename}: {why}; "
                f"see the executed copy {output}"
            ) from None


def ratio_markdown(record: dict[str, Any]) -> str:
    """A markdown table of the tier runtime record: each tier's epoch (total) time / DRAM per epoch
    count."""
    rows = record["measured"]["runtime"]
    tiers = list(dict.fromkeys(r["tier"] for r in rows if r["backend"] != "dram"))
    by = {(r["tier"], r["epochs"]): r for r in rows}
    lines = [
        "| epochs | " + " | ".join(f"{t} / DRAM" for t in tiers) + " | DRAM epoch (s) |",
        "|---:|" + "---:|" * (len(tiers) + 1),
    ]
    dram = next(r["tier"] for r in rows if r["backend"] == "dram")
    for e in sorted({r["epochs"] for r in rows}):
        cells = [f"{by[t, e]['epoch_ratio']:.2f}x ({by[t, e]['total_ratio']:.2f}x)" for t in tiers]
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {by[dram, e]['epoch_s']:.1f} |")
    return "\n".join(lines) + "\n"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `reproduce` on the CLI's subparsers (it sets `run`, as nvmlib.paper.cli expects)."""
    from nvmlib.paper.arguments import SEED

    p = subparsers.add_parser(
        "reproduce",
        help="regenerate the paper's figures from the notebooks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scale",
        choices=list(SCALES),
        default="default",
        help="smoke: a minute; default: the whole reproduction on a laptop (2 cores, 8 GB of RAM, "
        "20 GB of disk: under 10 min, 5.6 min measured on 2 shared cores); "
        "paper: model_4fc and 1/25/50/75 epochs on a server (set the tier paths)",
    )
    p.add_argument(
        "--notebook",
        action="append",
        choices=list(NOTEBOOKS),
        dest="only",
        help="run only this notebook (repeatable)",
    )
    p.add_argument("--notebooks-dir", default="notebooks")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--figures-dir", default="figures")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name (must run this Python)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument(
        "--check",
        action="store_true",
        help="only say what the run needs (memory, disk) and whether this machine has it",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, script_start: float | None = None) -> int:
    """Run `nvmlib reproduce` from parsed arguments; returns the exit status (script_start:
    nvmlib.paper.cli's calling convention, unused)."""
    if args.check:
        results_dir, figures_dir = Path(args.results_dir), Path(args.figures_dir)
        needs = plan_run(args.scale, results_dir, figures_dir, args.only, args.seed)[1]
        check_fits(args.scale, needs, results_dir, figures_dir, args.only)
        print(f"the {args.scale} preset {needs.summary()}: this machine has it")
        return 0
    seconds = reproduce(
        args.scale,
        args.notebooks_dir,
        args.results_dir,
        args.figures_dir,
        args.only,
        args.kernel,
        args.seed,
    )
    print(f"done in {sum(seconds.values()) / 60:.1f} min; figures in {args.figures_dir}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m nvmlib.paper.reproduce [--scale ...]`, the same as `nvmlib reproduce`."""
    parser = argparse.ArgumentParser(prog="nvmlib")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reproduce", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except NvmlibError as exc:
        print(f"nvmlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
