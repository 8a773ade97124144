"""The paper's experiment: SGD on MNIST recording a SWAG posterior on a memory tier, timed.

The initial parameters are recorded, then one update every `record_every` minibatches (and
after the last minibatch of each epoch). With swag_start > 0 (not in the paper: SWAG's burn-in)
recording begins with the parameters at the end of epoch swag_start - 1. Training is deterministic
given the seed: the model is initialised from it and epoch e visits the data in an order drawn from
(seed, e). Whenever the posterior writes a checkpoint, a small train state (model, optimizer,
position, RNG) is written atomically beside it, so an interrupted run resumes to the same result
(resume=True).
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
import pickle
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from nvmlib.backends import open_store, tier_class
from nvmlib.backends.base import Store
from nvmlib.backends.files import not_a_directory, write_atomically
from nvmlib.errors import ConfigError, PosteriorError, StoreError
from nvmlib.nn.swag import SWAG
from nvmlib.paper.data import Split, load
from nvmlib.paper.models import MODELS, make_model, n_params
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.codec import check_codec
from nvmlib.posterior.layout import check_max_rank
from nvmlib.posterior.log import ASSUMED_RATIO
from nvmlib.progress import tqdm

STATE_FORMAT = 1
STATE_FILE = "train_state.pt"
# settings that must not change between an interrupted run and its --resume
RESUME_KEYS = (
    "model",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "record_every",
    "swag_start",
    "max_rank",
    "seed",
    "limit",
    "dtype",
    "data_path",
    "codec",
)
STATE_KEYS = (
    "format",
    "config",
    "epoch",
    "batch",
    "updates",
    "finished",
    "model",
    "optimizer",
    "torch_rng",
)
# what torch.load and load_state_dict raise on bytes that are not a train state (empty, truncated,
# garbage; torch's zip reader also raises OSError EINVAL; its weights-only unpickler an IndexError
# for about 6% of random bytes, popping an empty stack)
NOT_A_STATE = (
    RuntimeError,
    ValueError,
    TypeError,
    LookupError,
    EOFError,
    pickle.UnpicklingError,
    OSError,
)


@dataclass
class TrainConfig:
    """Everything a run depends on; the comments name the paper's flags."""

    model: str  # positional
    data_path: str | None = None  # -p: directory of MNIST idx files (None: bundled MNIST)
    epochs: int = 1  # -e
    batch_size: int = 100  # -b
    lr: float = 1e-4  # -n
    momentum: float = 0.0  # -m
    record_every: int = 1  # -r
    swag_start: int = 0  # epochs of plain SGD before recording (0: the paper)
    max_rank: int | None = None  # -K: iterates kept (None: every recorded one)
    backend: str = "dram"  # memory tier
    posterior_path: str | None = None  # --posterior_path / -f: the tier's path
    shelf_size_mb: int | None = None  # -s: shelf size for shelf tiers
    shelf_backend: str | None = None  # -back: PyMM's engine (its backend=), hstore-cc | mapstore
    gpu: int = -1  # -c: CUDA device id, -1 for CPU
    limit: int | None = None  # first N training examples only
    seed: int = 0
    dtype: str = "float32"  # precision of the iterates on the tier
    codec: str | None = (
        None  # --codec: None (raw rows) or a compressed delta log (nvmlib.posterior.codec)
    )
    checkpoint_every: int = 100  # updates between durable checkpoints
    results_filepath: str | None = None  # timing CSV; a JSON record goes beside it
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    """A finished run: the posterior (still open), the SGD model, timings and the record."""

    swag: SWAG
    model: nn.Module
    store: Store
    test: Split
    timings: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def posterior(self) -> SWAGPosterior:
        return self.swag.posterior

    def close(self) -> None:
        """Close the posterior and its store (a dram posterior is gone afterwards)."""
        self.swag.close()
        self.store.close()


def train(
    config: TrainConfig,
    store: Store | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    script_start: float | None = None,
) -> TrainResult:
    """Run the experiment `config` describes; every check happens before training starts.

    store: an open store to use instead of opening config.backend at config.posterior_path.
    on_batch(epoch, batch): called after each minibatch (logging, or interrupting a run).
    script_start: time.perf_counter() at the start of the calling script ("total script time").
    """
    t_script = time.perf_counter() if script_start is None else script_start
    _check_config(config)
    device = resolve_device(config.gpu)
    if config.results_filepath:
        check_writable(Path(config.results_filepath))
    timings: dict[str, float] = {"posterior size (byte)": 0.0}
    t = time.perf_counter()
    train_split = load("mnist", "train", config.data_path, config.limit)
    timings["train data loading time (s)"] = time.perf_counter() - t
    t = time.perf_counter()
    test_split = load("mnist", "test", config.data_path)
    timings["test data loading time (s)"] = time.perf_counter() - t

    n_batches = math.ceil(len(train_split) / config.batch_size)
    capacity = 1 + (config.epochs - config.swag_start) * math.ceil(n_batches / config.record_every)
    n = n_params(make_model(config.model))  # cheap; sizes the posterior before the tier is touched

    t_experiment = time.perf_counter()
    own_store = store is None
    store = store if store is not None else open_tier(config)
    swag = None
    try:
        timings["open shelf time (s)"] = time.perf_counter() - t_experiment
        state_path = state_file(store, config.results_filepath)
        if not config.resume:
            check_capacity(store, config, n, capacity)
        t = time.perf_counter()
        model = make_model(config.model, config.seed).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        timings["make model time (s)"] = time.perf_counter() - t

        t = time.perf_counter()
        if config.resume:
            swag, position = _resume(store, config, state_path, model, optimizer, device)
        else:
            swag = SWAG(
                model,
                store=store,
                max_rank=config.max_rank,
                capacity=capacity,
                dtype=config.dtype,
                checkpoint_every=config.checkpoint_every,
                name=config.model,
                overwrite=config.overwrite,
                codec=config.codec,
            )
            position = (0, 0, 0)
            if config.swag_start == 0 and swag.collect():
                _save_state(state_path, config, model, optimizer, 0, 0, swag.n_collected, False)
        timings["make posterior time (s)"] = time.perf_counter() - t
        resumed_from = swag.n_collected if config.resume else None

        x_train, y_train = train_split.tensors(device)
        bar = tqdm(
            total=config.epochs * n_batches,
            initial=position[0] * n_batches + position[1],
            disable=None if config.progress else True,
            unit="batch",
            desc=f"{config.model} on {store.kind}",
        )
        with bar:
            for epoch in range(position[0], config.epochs):
                t = time.perf_counter()
                perm = epoch_order(config.seed, epoch, len(train_split)).to(device)
                first = position[1] if epoch == position[0] else 0
                model.train()
                for b in range(first, n_batches):
                    idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
                    optimizer.zero_grad(
                        set_to_none=False
                    )  # reusing grad buffers avoids a page-faulting allocation per step
                    loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                    loss.backward()
                    optimizer.step()
                    if _records(config, n_batches, epoch, b):
                        if swag.collect():
                            nxt = (epoch, b + 1) if b + 1 < n_batches else (epoch + 1, 0)
                            _save_state(
                                state_path, config, model, optimizer, *nxt, swag.n_collected, False
                            )
                    bar.update()
                    if on_batch is not None:
                        on_batch(epoch, b)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                _sync(device)
                timings[f"epoch {epoch + 1} time (s)"] = time.perf_counter() - t

        t = time.perf_counter()
        swag.flush()
        _save_state(state_path, config, model, optimizer, config.epochs, 0, swag.n_collected, True)
        timings["posterior finalize time (s)"] = time.perf_counter() - t
    except BaseException:
        if swag is not None:
            swag.close()
        if own_store:
            store.close()
        raise
    post = swag.posterior
    timings["posterior size (byte)"] = float(post.stored_bytes)
    timings["total experiment time (s)"] = time.perf_counter() - t_experiment
    timings["total script time (s)"] = time.perf_counter() - t_script
    record = _record(
        config, store, post, train_split, test_split, timings, device, resumed_from, state_path
    )
    if config.results_filepath:
        write_results(Path(config.results_filepath), timings, record)
    return TrainResult(swag, model, store, test_split, timings, record)


# ---- checks made before anything is trained ---------------------------------------------------
def _check_config(config: TrainConfig) -> None:
    if config.model not in MODELS:
        raise ConfigError(f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}")
    for name, value, low in (
        ("epochs (-e)", config.epochs, 1),
        ("batch size (-b)", config.batch_size, 1),
        ("record every (-r)", config.record_every, 1),
        ("checkpoint_every", config.checkpoint_every, 1),
        ("seed", config.seed, 0),
    ):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, not {value}")
    if not config.lr > 0 or config.momentum < 0:
        raise ConfigError(
            f"learning rate (-n) must be > 0 and momentum (-m) >= 0, not "
            f"{config.lr} and {config.momentum}"
        )
    if not 0 <= config.swag_start < config.epochs:
        raise ConfigError(
            f"swag_start must be an epoch before the last (0..{config.epochs - 1}), "
            f"not {config.swag_start}"
        )
    check_max_rank(config.max_rank)
    check_codec(config.codec)


def _records(config: TrainConfig, n_batches: int, epoch: int, batch: int) -> bool:
    """Whether the parameters after minibatch `batch` of `epoch` go into the posterior."""
    last = batch + 1 == n_batches
    if epoch < config.swag_start:
        return last and epoch == config.swag_start - 1
    return (batch + 1) % config.record_every == 0 or last


def resolve_device(gpu: int) -> torch.device:
    """-c: the CUDA device `gpu` (checked to exist), or the CPU for a negative id."""
    if gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no GPU is visible"
        )
        raise ConfigError(
            f"-c {gpu} asks for GPU {gpu} but {why} (torch {torch.__version__}); "
            "use -c -1 to train on the CPU"
        )
    count = torch.cuda.device_count()
    if gpu >= count:
        raise ConfigError(
            f"-c {gpu} asks for GPU {gpu} but this machine has {count} GPU(s), ids "
            f"0..{count - 1}; pick one of those (see nvidia-smi) or -c -1 for the CPU"
        )
    return torch.device("cuda", gpu)


def check_writable(file: Path, flag: str = "--results_filepath", create: bool = True) -> None:
    """Fail now, not after the work, when `file` (given with `flag`) cannot be written; creates its
    directory (create=False: tries the nearest directory that exists instead, and creates
    nothing)."""
    if file.is_dir():
        raise ConfigError(
            f"{flag} {file} is a directory; give a file name such as {file / 'run.csv'}"
        )
    blocked = not_a_directory(file.parent)
    if blocked is not None:
        raise ConfigError(
            f"cannot write {file}: {blocked} is a file, not a directory; choose a writable {flag}"
        )
    where = (
        file.parent
        if create
        else next(d for d in (file.parent, *file.parent.parents) if d.is_dir())
    )
    probe = where / f".{file.name}.probe"
    try:
        if create:
            file.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "w"):
            pass
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write {file}: {exc.strerror or exc}; choose a writable {flag}"
        ) from exc
    if file.exists() and not os.access(file, os.W_OK):
        raise ConfigError(f"{file} is not writable; fix its permissions or choose another {flag}")


def open_tier(config: TrainConfig) -> Store:
    """Open config.backend at config.posterior_path, passing the shelf options the tier takes."""
    options: dict[str, Any] = {}
    accepted = inspect.signature(tier_class(config.backend).__init__).parameters
    for flag, key, value in (
        ("-s", "size_mb", config.shelf_size_mb),
        ("-back", "engine", config.shelf_backend),
    ):
        if value is not None:
            if key not in accepted:
                raise ConfigError(
                    f"{flag} applies to shelf tiers; the {config.backend} tier does not take it"
                )
            options[key] = value
    if config.backend == "dram" and config.posterior_path:
        raise ConfigError(
            "the dram tier keeps the posterior in memory and takes no path; "
            "drop --posterior_path/-f or choose --backend mmap"
        )
    return open_store(config.backend, config.posterior_path, **options)


def check_capacity(store: Store, config: TrainConfig, n: int, capacity: int) -> None:
    """StoreError naming the size needed when the tier cannot hold the run's posterior."""
    rows = config.max_rank or capacity
    need = SWAGPosterior.required_bytes(n, rows, config.dtype, config.codec, store.grows)
    guess = (
        f" (its {config.codec} log counted at {ASSUMED_RATIO}x less than raw rows)"
        if config.codec and store.grows
        else ""
    )
    what = (
        f"{config.model} for {config.epochs} epoch(s) keeps {rows} iterates of {n} parameters: "
        f"its posterior needs {need / 1e9:.3f} GB{guess}"
    )
    if config.shelf_size_mb is not None and need > config.shelf_size_mb * 2**20:
        raise StoreError(
            f"{what} but the shelf is {config.shelf_size_mb} MB; pass -s "
            f"{math.ceil(need / 2**20)} or more, or keep fewer iterates (-K, -r, -e)"
        )
    free = store.free_bytes()
    if free is not None and need > free:
        raise StoreError(
            f"{what} but {store.describe()} has {free / 1e9:.3f} GB free; free space, "
            "choose a larger tier or path, or keep fewer iterates (-K, -r, -e)"
        )


# ---- determinism and resuming -------------------------------------------------------------
def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits the n training examples: a function of (seed,
    epoch)."""
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    )
    return torch.randperm(n, generator=gen)


def state_file(store: Store, results_filepath: str | Path | None = None) -> Path | None:
    """Where the train state goes: the posterior's directory, else beside the results file."""
    if store.path is not None and store.path.is_dir():
        return store.path / STATE_FILE
    if results_filepath:
        return Path(results_filepath).with_suffix(".state.pt")
    return None


def _save_state(
    path: Path | None,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    batch: int,
    updates: int,
    finished: bool,
) -> None:
    """Write the train state atomically (files.write_atomically); a full disk is a StoreError naming
    it."""
    if path is None:
        return
    state = {
        "format": STATE_FORMAT,
        "config": {k: getattr(config, k) for k in RESUME_KEYS},
        "epoch": epoch,
        "batch": batch,
        "updates": updates,
        "finished": finished,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    if path.is_file():  # the state before stays as previous_state(path) (a hard link, swapped in)
        link = path.with_name(path.name + ".link")
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous_state(path))
    write_atomically(path, buf.getbuffer())


def previous_state(path: Path) -> Path:
    """Where the train state before the newest is kept: the posterior's checkpoint of the newest
    is written behind training, so a power loss while it is written leaves the posterior at the
    checkpoint before, which this state matches."""
    return path.with_name(path.name + ".previous")


def load_state(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A train state written by train: ConfigError when there is none or another version wrote it,
    PosteriorError when it is damaged (empty, truncated, not a train state)."""
    if not path.is_file():
        raise ConfigError(
            f"no train state at {path}: this run cannot be resumed or reopened; "
            "check the path, or start it again without --resume"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except NOT_A_STATE as exc:
        raise _damaged(
            path, f"torch.load cannot read its {path.stat().st_size} bytes ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise _damaged(path, "not a train state")
    if state["format"] != STATE_FORMAT:
        raise ConfigError(f"{path} was written by another nvmlib version; start the run again")
    if not set(STATE_KEYS) <= state.keys() or not set(RESUME_KEYS) <= set(state["config"]):
        raise _damaged(path, "it lacks entries a train state has")
    return state


def _damaged(path: Path, why: str) -> PosteriorError:
    return PosteriorError(
        f"the train state {path} is damaged: {why}; put back a copy of it, or train "
        "the run again from the start (nvmlib train ... --overwrite)"
    )


def _restore(
    path: Path,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load the state's model (and optimizer and RNG) into `model` (and `optimizer`); PosteriorError
    when they do not fit."""
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"].cpu())
    except NOT_A_STATE as exc:
        raise _damaged(
            path, f"its parameters do not fit {state['config']['model']} ({type(exc).__name__})"
        ) from None


def _resume(
    store: Store,
    config: TrainConfig,
    state_path: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[SWAG, tuple[int, int, int]]:
    """Reopen the posterior at the last train state and restore model, optimizer and RNG."""
    if state_path is None:
        raise ConfigError(
            "nothing to resume: a dram posterior does not outlive its process; "
            "use a persistent tier (--backend mmap --posterior_path DIR)"
        )
    state = load_state(state_path, device)
    changed = [
        f"{k}: {state['config'][k]!r} -> {getattr(config, k)!r}"
        for k in RESUME_KEYS
        if state["config"][k] != getattr(config, k)
    ]
    if changed:
        raise ConfigError(
            f"--resume needs the settings of the interrupted run; changed: {'; '.join(changed)}"
        )
    swag = SWAG.open(model, store=store)
    try:
        previous = previous_state(state_path)
        if swag.n_collected < state["updates"] and previous.is_file():
            # a crash while the newest state's checkpoint was written: the one before holds
            state_path, state = previous, load_state(previous, device)
        _restore(state_path, state, model, optimizer)
        swag.posterior.truncate(state["updates"])
    except BaseException:
        swag.close()
        raise
    return swag, (state["epoch"], state["batch"], state["updates"])


def reopen(
    backend: str,
    path: str | Path,
    device: torch.device | str = "cpu",
    readonly: bool = True,
    results_filepath: str | Path | None = None,
) -> tuple[SWAGPosterior, nn.Module, Store]:
    """A finished run on a persistent tier: its posterior and its SGD model (final parameters).

    results_filepath: the run's results CSV, for tiers whose path is not a directory (shelves).
    """
    store = open_store(backend, path, readonly=readonly)
    try:
        where = state_file(store, results_filepath)
        if where is None:
            raise ConfigError(
                f"{store.describe()} is not a directory: pass the run's --results_filepath "
                "to find its train state"
            )
        state = load_state(where, device)
        model = make_model(state["config"]["model"]).to(device)
        _restore(where, state, model)
        post = SWAG.open(model, store=store, readonly=readonly).posterior
    except BaseException:
        store.close()
        raise
    return post, model, store


# ---- what a run writes ------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_facts(device: torch.device) -> dict[str, Any]:
    """The machine a run measured: CPU, memory, GPU, OS."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    facts = {
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "device": str(device),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def versions() -> dict[str, str | None]:
    import tqdm as tqdm_module

    import nvmlib

    return {
        "nvmlib": nvmlib.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "tqdm": tqdm_module.__version__,
    }


def _record(
    config: TrainConfig,
    store: Store,
    post: SWAGPosterior,
    train_split: Split,
    test_split: Split,
    timings: dict[str, float],
    device: torch.device,
    resumed_from: int | None,
    state_path: Path | None,
) -> dict[str, Any]:
    return {
        "config": asdict(config),
        "tier": {
            "kind": store.kind,
            "path": str(store.path) if store.path else None,
            "describe": store.describe(),
            "persistent": store.persistent,
        },
        "posterior": {
            "n_params": post.n_params,
            "n_collected": post.n_collected,
            "rank": post.rank,
            "max_rank": post.max_rank,
            "capacity": post.capacity,
            "dtype": str(post.dtype),
            "nbytes": post.nbytes,
            "stored_bytes": post.stored_bytes,
            "codec": post.meta.get("codec"),
        },
        "data": {
            s.split: {"source": s.source, "examples": len(s), "verified": s.verified}
            for s in (train_split, test_split)
        },
        "timings": timings,
        "resumed_from_update": resumed_from,
        "train_state": str(state_path) if state_path else None,
        "versions": versions(),
        "machine": machine_facts(device),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_results(csv_path: Path, timings: dict[str, float], record: dict[str, Any]) -> None:
    """The paper's timing rows as `csv_path` and the full record as the same name with .json."""
    csv_path.write_text("metric,value\n" + "".join(f"{k},{v!r}\n" for k, v in timings.items()))
    csv_path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
