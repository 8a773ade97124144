"""`nvmlib` command line: one small function per subcommand, accepting the paper's flags."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from nvmlib.errors import ConfigError, DataError, NvmlibError
from nvmlib.paper import probe, reproduce
from nvmlib.paper.arguments import SEED, number
from nvmlib.posterior.codec import CODECS
from nvmlib.posterior.layout import FLOAT_DTYPES


def _tier_args(p: argparse.ArgumentParser) -> None:
    """Where the posterior lives: --backend, --posterior_path (files) or -f (shelves)."""
    p.add_argument(
        "--backend",
        help="memory tier: dram, mmap, pmem, pymm, zarr "
        "(default: pymm with -f, mmap with --posterior_path, else dram)",
    )
    p.add_argument("--posterior_path", help="the tier's directory (mmap, pmem, zarr)")
    p.add_argument(
        "-f", dest="shelf_path", help="the shelf's place: a pmem mount or a devdax device"
    )
    p.add_argument(
        "-c", dest="gpu", type=int, default=-1, help="CUDA device id; -1 (default) for the CPU"
    )
    p.add_argument(
        "-p", dest="data_path", help="directory of MNIST idx(.gz) files (default: bundled MNIST)"
    )


def _tier(args: argparse.Namespace) -> tuple[str, str | None]:
    """(backend, path) from --backend, --posterior_path and -f, as the paper's scripts meant
    them."""
    if args.posterior_path and args.shelf_path and args.posterior_path != args.shelf_path:
        raise ConfigError(
            "give the tier's path once: --posterior_path (file tiers) or -f (shelves)"
        )
    path = args.posterior_path or args.shelf_path
    backend = args.backend or ("pymm" if args.shelf_path else "mmap" if path else "dram")
    return backend, path


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="SGD on MNIST recording a SWAG posterior",
        description="Train a model with SGD and record its SWAG posterior on a memory tier; "
        "writes the paper's timing CSV and a JSON record beside it.",
    )
    p.add_argument("model", help="model_2conv2fc, model_2fc, model_3fc or model_4fc")
    _tier_args(p)
    p.add_argument("-e", dest="epochs", type=int, default=1, help="epochs (default 1)")
    p.add_argument("-b", dest="batch_size", type=int, default=100, help="batch size (default 100)")
    p.add_argument(
        "-n",
        dest="lr",
        type=number(float, 0, "a learning rate > 0 (e.g. 1e-4)", strict=True),
        default=1e-4,
        help="learning rate (default 1e-4)",
    )
    p.add_argument(
        "-m",
        dest="momentum",
        type=number(float, 0, "a momentum >= 0 (e.g. 0.9)"),
        default=0.0,
        help="momentum (default 0)",
    )
    p.add_argument(
        "-r", dest="record_every", type=int, default=1, help="record every r-th minibatch (1)"
    )
    p.add_argument(
        "-K", dest="max_rank", type=int, help="posterior size: iterates kept (default: all)"
    )
    p.add_argument("-s", dest="shelf_size_mb", type=int, help="shelf size in MB (shelf tiers)")
    p.add_argument("-back", dest="shelf_backend", help="PyMM shelf backend: hstore-cc or mapstore")
    p.add_argument("--results_filepath", help="timing CSV to write (a .json record goes beside it)")
    p.add_argument("--limit", type=int, help="use only the first N training examples")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument(
        "--swag_start", type=int, default=0, help="epochs of SGD before recording (default 0)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=FLOAT_DTYPES, help="precision of the stored iterates"
    )
    p.add_argument(
        "--codec",
        choices=CODECS,
        help="store iterates as compressed XOR-deltas (default: raw rows)",
    )
    p.add_argument("--checkpoint_every", type=int, default=100, help="updates between checkpoints")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run at its last checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a posterior already at the path"
    )
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace, script_start: float) -> int:
    from nvmlib.paper.train import TrainConfig, train

    backend, path = _tier(args)
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "run", "shelf_path")}
    config = TrainConfig(**{**fields, "backend": backend, "posterior_path": path})
    result = train(config, script_start=script_start)
    try:
        for name, value in result.timings.items():
            print(f"{name},{value:.6g}")
    finally:
        result.close()
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        allow_abbrev=False,
        help="SGD vs SWA vs SWAG: accuracy, NLL, ECE, Brier, OOD",
        description="Evaluate a trained run's posterior (a persistent tier) on MNIST, "
        "rotated MNIST and Fashion-MNIST (OOD).",
    )
    _tier_args(p)
    p.add_argument(
        "-S",
        dest="samples",
        type=number(int, 1, "at least 1 sample (e.g. -S 30)"),
        default=30,
        help="posterior samples (default 30)",
    )
    p.add_argument(
        "--scale",
        type=number(float, 0, "a covariance scale >= 0 (0.5 is SWAG's)"),
        default=0.5,
        help="SWAG covariance scale (default 0.5)",
    )
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument(
        "--angles", type=float, nargs="*", default=None, help="rotations in degrees (0 15 ... 180)"
    )
    p.add_argument(
        "--fashion_path",
        help="directory of Fashion-MNIST idx files (default: Debian's); "
        "without them the OOD part is skipped",
    )
    p.add_argument(
        "--train_results",
        help="the training run's --results_filepath: finds its train state "
        "when the tier's path is not a directory (devdax device, shelf, zarr URL)",
    )
    p.add_argument("--results_filepath", help="JSON file to write the metrics to")
    p.add_argument("--limit", type=int, help="use only the first N test (and OOD) examples")
    p.add_argument(
        "--scheduler",
        help="a dask scheduler's address (tcp://host:8786): sample and predict on "
        "its workers, which must see the (zarr) posterior's path",
    )
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace, script_start: float) -> int:
    from nvmlib.paper.data import load
    from nvmlib.paper.evaluate import ANGLES, evaluate
    from nvmlib.paper.train import check_writable, reopen, resolve_device

    backend, path = _tier(args)
    if path is None:
        raise ConfigError(
            "a dram posterior does not outlive its training run: evaluate it in Python "
            "(nvmlib.paper.train.train, then nvmlib.paper.evaluate.evaluate) or train on a "
            "persistent tier and pass its --posterior_path"
        )
    if args.results_filepath:
        check_writable(Path(args.results_filepath))
    device = resolve_device(args.gpu)
    test = load("mnist", "test", args.data_path, limit=args.limit)
    try:
        ood = load("fashion", "test", args.fashion_path, limit=args.limit)
    except DataError as exc:
        if args.fashion_path:
            raise
        print(f"nvmlib: note: no OOD evaluation: {exc}", file=sys.stderr)
        ood = None
    executor = _executor(args.scheduler) if args.scheduler else None
    post, model, store = reopen(backend, path, device, results_filepath=args.train_results)
    try:
        result = evaluate(
            model,
            post,
            test,
            ood,
            args.samples,
            args.scale,
            args.seed,
            ANGLES if args.angles is None else args.angles,
            executor=executor,
        )
    finally:
        post.close()
        store.close()
        if executor is not None:
            executor.client.close()
    print(result.table().to_string(float_format="%.4f"))
    if ood is not None:
        print(result.ood.to_string(index=False, float_format="%.4f"))
    if args.results_filepath:
        Path(args.results_filepath).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _executor(address: str):
    """A nvmlib.dask.DaskExecutor of the scheduler at `address`, or a ConfigError."""
    try:
        from nvmlib.dask import connect
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--scheduler needs {exc.name!r}: pip install 'nvmlib[zarr]'") from exc
    return connect(address)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], object], ...] = (
    add_train,
    add_evaluate,
    probe.add_parser,
    reproduce.add_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvmlib",
        allow_abbrev=False,
        description="SWAG posteriors on the memory tier you have.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; an NvmlibError prints `nvmlib: error: ...` and returns 2."""
    script_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args, script_start)
    except NvmlibError as exc:
        print(f"nvmlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
