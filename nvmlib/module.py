"""SWAG for any torch module: collect its parameters into a SWAGPosterior on a memory tier,
draw models from the posterior (BatchNorm statistics recomputed for each), and average their
predictions (Bayesian model averaging); MultiSWAG keeps several such runs side by side.

The iterate is every parameter of the module (`model.parameters()`), as in Maddox et al.;
buffers such as BatchNorm's running statistics are not part of the posterior: they belong to
one set of weights, so they are recomputed on `bn_loader` for every sampled model.
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as _update_bn

from nvmlib.backends import open_store
from nvmlib.backends.base import Store
from nvmlib.errors import ConfigError, InputError, PosteriorError
from nvmlib.sharded import (ShardedPosterior, distribution, is_sharded, local_shards, rank_dir, unwrap, world,
                            write_layout)
from nvmlib.staging import host_dtype, make_stager, unflatten_into
from nvmlib.swag import SWAGPosterior

Loader = Iterable[Any] | torch.Tensor  # a DataLoader yielding (x, y) or x, or a tensor of inputs
TENSOR_BATCH = 512  # rows of a tensor "loader" per forward pass


def batches(loader: Loader, device: torch.device, name: str = "the loader") -> Iterator[torch.Tensor]:
    """The inputs of each batch of `loader`, on `device`; an InputError naming it (`name`) when a
    pass over it yields no batch, the first or a later one."""
    if isinstance(loader, torch.Tensor):  # views, no copy
        loader = [loader[i:i + TENSOR_BATCH] for i in range(0, len(loader), TENSOR_BATCH)]
    empty = True
    for item in loader:
        x = item[0] if isinstance(item, (list, tuple)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} yielded a {type(x).__name__}, not a tensor: pass a DataLoader "
                            "yielding (x, y) or x, or a tensor of inputs")
        empty = False
        yield x.to(device)
    if empty:
        raise InputError(f"{name} yielded no batches: pass a non-empty DataLoader, list or tensor of inputs "
                         "that yields its batches each time it is iterated (once per model)")


def check_reiterable(loader: Loader, name: str) -> None:
    """Refuse a one-shot iterator (a generator, iter(loader)) where each drawn model reads `loader` again."""
    if isinstance(loader, Iterator):
        raise InputError(f"{name} is a one-shot iterator ({type(loader).__name__}): it is read once per model, "
                         "so every model after the first would see nothing; pass a DataLoader or a "
                         "list/tensor, which can be iterated once per model")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers (whose running statistics depend on the weights)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fingerprint(model: nn.Module) -> str:
    """A short digest of the model's parameter names, shapes and dtypes: its architecture."""
    text = ";".join(f"{k}:{tuple(p.shape)}:{p.dtype}" for k, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parameters(model: nn.Module) -> list[torch.Tensor]:
    """The module's parameters, checked to be floating point and on one device."""
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"{type(model).__name__} has no parameters: SWAG needs a trainable model")
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; SWAG needs floating-point parameters: "
                            "make it a buffer (register_buffer) if it is not trained")
    if len({p.device for p in params}) > 1:
        raise ConfigError("the model's parameters are on several devices; move the model to one device "
                          "(model.to(device)) before wrapping it in SWAG")
    return params


def _place(model: nn.Module, path: str | Path | None, distributed: str, write: bool
           ) -> tuple[nn.Module, list[torch.Tensor] | None, str | Path | None, list[dict] | None]:
    """The module to record (unwrapped from DDP), the tensors this process records (None: another
    rank records these replicated parameters), where, and the shard layout of a sharded model."""
    model = unwrap(model)
    mode = distribution(model, distributed)
    rank, size = world()
    if mode == "replicated" and rank != 0 and write:
        return model, None, path, None
    params = _parameters(model)
    if mode != "sharded":
        return model, params, path, None
    if path is None:
        raise ConfigError("the model's parameters are sharded (FSDP): each rank records its shards under one "
                          "directory, so pass a path (a tier with files: mmap, pmem, zarr)")
    tensors, layout = local_shards(model)
    return model, tensors, rank_dir(path, rank, size), layout


def _forward_error(x: torch.Tensor, exc: RuntimeError) -> ValueError:
    return ValueError(f"the model cannot take a batch of shape {tuple(x.shape)} ({x.dtype}) from the loader: "
                      f"{str(exc).splitlines()[0]}; pass a loader yielding inputs shaped as in training")


class SWAG:
    """A SWAG posterior of `model`'s parameters on a memory tier.

    SWAG(model, tier, path, max_rank=K) creates a new posterior (tier and path as in open_store, or
    store=<Store>); SWAG.open(model, tier, path) reopens one. After each optimizer step call
    collect(). max_rank=None keeps every iterate: pass capacity=<number of collects> then.
    codec="delta-zstd" (or "delta-lz4") stores compressed XOR-deltas of consecutive iterates.
    dtype: how iterates are stored; by default the widest parameter dtype, which holds every
    parameter exactly (a float16 + float32 model stores float32, bfloat16 widens to float32).
    Drawn models keep each parameter's own dtype.

    Under torch.distributed (distributed="auto", nvmlib.sharded): a DDP model (wrapper unwrapped)
    is recorded by global rank 0 alone, the other ranks only count their collects; a sharded one
    (FSDP2) by every rank, its shards into `path/rank-{r}-of-{n}/`. "local": each process its own.
    """

    def __init__(self, model: nn.Module, tier: str = "dram", path: str | Path | None = None, *,
                 max_rank: int | None = 20, capacity: int | None = None, store: Store | None = None,
                 dtype: str | None = None, checkpoint_every: int = 100, name: str | None = None,
                 overwrite: bool = False, codec: str | None = None, distributed: str = "auto",
                 **store_options: Any) -> None:
        model, params, where, layout = _place(model, path, distributed, write=True)
        if params is None:
            self._setup(model, [], None, False, None)
            return
        if layout is not None and store is not None:
            raise ConfigError("a sharded model's ranks each open their own store: pass tier and path, not store=")
        dtype = dtype or str(host_dtype(params)).removeprefix("torch.")
        own = store is None
        store = open_store(tier, where, **store_options) if own else store
        try:
            post = SWAGPosterior.create(store, sum(p.numel() for p in params), max_rank, dtype, checkpoint_every,
                                        capacity=capacity, model=f"{name or type(model).__name__}#{fingerprint(model)}",
                                        overwrite=overwrite, codec=codec)
            if layout is not None:
                write_layout(path, layout)
        except BaseException:
            if own:
                store.close()
            raise
        self._setup(model, params, store, own, post)

    @classmethod
    def open(cls, model: nn.Module, tier: str = "dram", path: str | Path | None = None, *,
             store: Store | None = None, readonly: bool = False, distributed: str = "auto",
             **store_options: Any) -> "SWAG":
        """Reopen the posterior of `model` at `path` (or on `store`); refused for another architecture.
        The directory of a sharded run opens, read-only, as the posterior of the full model."""
        model, params, where, _ = _place(model, path, distributed, write=not readonly)
        self = cls.__new__(cls)
        if params is None:
            self._setup(model, [], None, False, None)
            return self
        n_params = sum(p.numel() for p in params)
        sharded = store is None and where == path and is_sharded(path)  # the ranks' posteriors, in one process
        if sharded and not readonly:
            raise PosteriorError(f"{path} holds the per-rank posteriors of a sharded run: open it with readonly=True "
                                 "to sample it in one process, or for writing from each rank of that run")
        own = store is None and not sharded
        store = open_store(tier, where, readonly=readonly, **store_options) if own else store
        try:
            post: SWAGPosterior | ShardedPosterior = (
                ShardedPosterior.open(tier, path, n_params, **store_options) if sharded
                else SWAGPosterior.open(store, n_params=n_params, readonly=readonly))
            stored = post.meta.get("model") or ""
            if "#" in stored and stored.rsplit("#", 1)[1] != fingerprint(model):
                post.close()
                raise PosteriorError(f"the posterior on {post.store.describe()} was made for another architecture "
                                     f"({stored.rsplit('#', 1)[0]}, same parameter count, other layer shapes) "
                                     f"than this {type(model).__name__}; open it with the model it was made for")
        except BaseException:
            if own:
                store.close()
            raise
        self._setup(model, params, post.store, own, post)
        return self

    def _setup(self, model: nn.Module, params: list[torch.Tensor], store: Store | None, own: bool,
               post: SWAGPosterior | ShardedPosterior | None) -> None:
        """post None: a replica rank, which records nothing and counts its collects in _idle."""
        self.model = model
        self.store = store
        self._own_store = own
        self._post = post
        self._idle = 0
        self._stager = None if post is None or post.readonly else make_stager(params, post.update)
        self._until_checkpoint: int | None = None
        self._work: nn.Module | None = None  # the copy predict loads each drawn model into

    # ---- collecting ---------------------------------------------------------------------
    def collect(self) -> bool:
        """Record the model's parameters now as one iterate; True when this wrote a checkpoint
        (everything collected so far is durable). On a GPU the copy is asynchronous, except for
        an update that checkpoints, which waits so that its True means what it says."""
        if self._post is None:  # a replica: global rank 0 records these parameters
            self._idle += 1
            return False
        if self._stager is None:
            raise PosteriorError("this SWAG was opened read-only; open it with readonly=False to collect")
        if self._until_checkpoint is None:
            self._stager.drain()
            self._until_checkpoint = self._post.updates_to_checkpoint()
        sync = self._until_checkpoint <= 1
        wrote = self._stager.stage(sync)
        self._until_checkpoint = None if sync else self._until_checkpoint - 1
        return wrote

    @property
    def posterior(self) -> SWAGPosterior:
        """The SWAGPosterior underneath, with every collected iterate recorded."""
        if self._post is None:
            raise PosteriorError(f"rank {world()[0]} records nothing: the parameters are replicated (DDP), so global "
                                 "rank 0 writes the posterior; use it there, or open it after training with "
                                 "SWAG.open(model, tier, path, readonly=True)")
        if self._stager is not None:
            self._stager.drain()
        return self._post

    @property
    def records(self) -> bool:
        """Whether this process records iterates (False on a replica rank of a DDP run)."""
        return self._post is not None

    @property
    def n_collected(self) -> int:
        """Iterates collected so far (on a replica rank: its collects, which rank 0 recorded)."""
        return self._idle if self._post is None else self.posterior.n_collected

    def flush(self) -> None:
        """Checkpoint now: everything collected so far becomes durable."""
        if self._post is not None:
            self.posterior.flush()
        self._until_checkpoint = None

    def truncate(self, count: int) -> None:
        """Roll back to the first `count` iterates, e.g. to resume training from a checkpoint taken then."""
        if self._post is None:
            self._idle = count
            return
        self.posterior.truncate(count)
        self._until_checkpoint = None

    # ---- sampling and predicting --------------------------------------------------------
    def _copy(self) -> nn.Module:
        """A copy of the wrapped model, without its gradients, to load drawn parameters into."""
        model = copy.deepcopy(self.model)
        for p in model.parameters():
            p.grad = None
        return model

    def _load(self, theta: np.ndarray, bn_loader: Loader | None, update_bn: bool) -> nn.Module:
        """predict's working copy with parameters `theta` and, if it has BatchNorm, fresh statistics;
        a failed refresh drops the working copy (update_bn leaves its momenta unset then)."""
        if self._work is None:
            self._work = self._copy()
        try:
            return load(self._work, theta, bn_loader, update_bn)
        except BaseException:
            self._work = None
            raise

    def _check_bn(self, bn_loader: Loader | None, update_bn: bool) -> None:
        check_bn(self.model, bn_loader, update_bn)

    def sample(self, S: int, scale: float = 0.5, seed: int | None = None) -> np.ndarray:
        """S parameter vectors (S, n_params) float32 from one streamed pass over the log."""
        return self.posterior.sample(S, scale=scale, seed=seed)

    def sample_models(self, S: int, bn_loader: Loader | None = None, scale: float = 0.5, seed: int | None = None,
                      update_bn: bool = True) -> Iterator[nn.Module]:
        """S distinct models drawn from one pass over the log, each a new copy of the wrapped model
        (which is never changed) in eval mode, its BatchNorm statistics recomputed on bn_loader:
        list() of them holds S models' memory."""
        self._check_bn(bn_loader, update_bn)
        thetas = self.sample(S, scale, seed)  # the pass over the log happens here, at the call
        return (load(self._copy(), theta, bn_loader, update_bn) for theta in thetas)

    def mean_model(self, bn_loader: Loader | None = None, update_bn: bool = True) -> nn.Module:
        """The SWA solution θ̄ as a new model (BatchNorm statistics recomputed on bn_loader)."""
        self._check_bn(bn_loader, update_bn)
        return load(self._copy(), self.posterior.mean(), bn_loader, update_bn)

    def predict(self, loader: Loader, S: int = 30, bn_loader: Loader | None = None, scale: float = 0.5,
                seed: int | None = 0, update_bn: bool = True, executor: Any = None) -> np.ndarray:
        """Bayesian model average: softmax probabilities (N, classes) float64 averaged over S models.

        executor: nvmlib.dask.DaskExecutor(client); the S models' BatchNorm refreshes and predictions
        then run on its workers (the loaders are gathered into tensors and sent once), and a posterior
        on a tier the workers can open (Store.shared: zarr) is also sampled there. The result equals
        the local one to float rounding."""
        self._check_bn(bn_loader, update_bn)
        check_reiterable(loader, "loader")
        shared = executor if executor is not None and self.store.shared else None
        thetas = self.posterior.sample(S, scale=scale, seed=seed, executor=shared)
        if executor is not None:
            return executor.swag_predict(self.model, thetas, gather(loader),
                                         gather(bn_loader, "bn_loader") if update_bn and bn_loader is not None
                                         else None)
        return sum(probabilities(self._load(theta, bn_loader, update_bn), loader) for theta in thetas) / len(thetas)

    # ---- closing ------------------------------------------------------------------------
    def close(self) -> None:
        """Record what is in flight, checkpoint, and close the store if SWAG opened it."""
        if self._post is None:
            return
        try:
            if self._stager is not None:
                self._stager.close()
            self._post.close()
        finally:
            if self._own_store:
                self.store.close()

    def __enter__(self) -> "SWAG":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SWAG of {type(self.model).__name__}: {self._post!r}>"


def check_bn(model: nn.Module, bn_loader: Loader | None, update_bn: bool) -> None:
    """Refuse to draw models with BatchNorm and no data to recompute its statistics on, or data
    that can be read only once."""
    if not (update_bn and has_batchnorm(model)):
        return
    if bn_loader is None:
        raise ConfigError("the model has BatchNorm layers, whose statistics belong to other weights: pass "
                          "bn_loader=<training data> to recompute them for each sampled model, or "
                          "update_bn=False to keep the stale statistics knowingly")
    check_reiterable(bn_loader, "bn_loader")


def load(model: nn.Module, theta: np.ndarray, bn_loader: Loader | None, update_bn: bool = True) -> nn.Module:
    """`model` with parameters `theta` (each in its own dtype), in eval mode, its BatchNorm statistics
    recomputed on bn_loader (torch.optim.swa_utils.update_bn) when it has BatchNorm and update_bn is set."""
    unflatten_into(theta, model.parameters())
    if update_bn and has_batchnorm(model):
        check_bn(model, bn_loader, update_bn)
        last: list[torch.Tensor] = []

        def inputs() -> Iterator[torch.Tensor]:
            for x in batches(bn_loader, next(model.parameters()).device, "bn_loader"):
                last[:] = [x]
                yield x

        try:
            with torch.no_grad():
                _update_bn(inputs(), model)
        except RuntimeError as exc:
            if last:
                raise _forward_error(last[0], exc) from exc
            raise
    model.eval()
    return model


def gather(loader: Loader, name: str = "the loader") -> torch.Tensor:
    """Every input of `loader` as one CPU tensor (to send to a cluster's workers once)."""
    return torch.cat(list(batches(loader, torch.device("cpu"), name)))


@torch.no_grad()
def probabilities(model: nn.Module, loader: Loader) -> np.ndarray:
    """Softmax probabilities (N, classes) float64 of `model` on every input of `loader`."""
    device = next(model.parameters()).device
    out = []
    for x in batches(loader, device):
        try:
            logits = model(x)
        except RuntimeError as exc:
            raise _forward_error(x, exc) from exc
        out.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(out).numpy()


class MultiSWAG:
    """M independent SWAG runs of one architecture, kept side by side (root/run0, root/run1, …),
    and one Bayesian model average over all of them (M runs × S samples)."""

    def __init__(self, runs: Sequence[SWAG]) -> None:
        if not runs:
            raise ValueError("MultiSWAG needs at least one run")
        self.runs = list(runs)

    @classmethod
    def create(cls, models: Sequence[nn.Module], tier: str = "dram", root: str | Path | None = None,
               **options: Any) -> "MultiSWAG":
        """One new posterior per model (independently initialised copies of one architecture)."""
        if len({fingerprint(m) for m in models}) > 1:
            raise ConfigError("MultiSWAG runs must share one architecture; the models given differ")
        runs: list[SWAG] = []
        try:
            for i, model in enumerate(models):
                runs.append(SWAG(model, tier, cls._run_path(root, i), **options))
        except BaseException:
            for run in runs:
                run.close()
            raise
        return cls(runs)

    @classmethod
    def open(cls, model: nn.Module, tier: str, root: str | Path, **options: Any) -> "MultiSWAG":
        """Every run under `root`, for sampling and prediction (read-only unless readonly=False)."""
        paths = sorted((p for p in Path(root).glob("run*") if p.name[3:].isdigit()), key=lambda p: int(p.name[3:]))
        if not paths:
            raise PosteriorError(f"{root} holds no MultiSWAG runs (run0, run1, …); check the path")
        options.setdefault("readonly", True)
        runs: list[SWAG] = []
        try:
            for path in paths:
                runs.append(SWAG.open(model, tier, path, **options))
        except BaseException:
            for run in runs:
                run.close()
            raise
        return cls(runs)

    @staticmethod
    def _run_path(root: str | Path | None, i: int) -> Path | None:
        return None if root is None else Path(root) / f"run{i}"

    def __len__(self) -> int:
        return len(self.runs)

    def predict_runs(self, loader: Loader, S: int = 30, bn_loader: Loader | None = None, scale: float = 0.5,
                     seed: int = 0, update_bn: bool = True) -> list[np.ndarray]:
        """Each run's BMA (N, classes) over S samples; run i draws with its own seed from `seed`."""
        seeds = np.random.SeedSequence(seed).generate_state(len(self.runs))
        return [run.predict(loader, S, bn_loader, scale, int(s), update_bn) for run, s in zip(self.runs, seeds)]

    def predict(self, loader: Loader, S: int = 30, bn_loader: Loader | None = None, scale: float = 0.5,
                seed: int = 0, update_bn: bool = True) -> np.ndarray:
        """The BMA over all M × S models (N, classes) float64."""
        return np.mean(self.predict_runs(loader, S, bn_loader, scale, seed, update_bn), axis=0)

    def close(self) -> None:
        for run in self.runs:
            run.close()

    def __enter__(self) -> "MultiSWAG":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
