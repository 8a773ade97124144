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
import numbers
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from nvmlib.backends import open_store
from nvmlib.backends.base import Store
from nvmlib.errors import ConfigError, InputError, PosteriorError
from nvmlib.nn.predict import Loader, bma, check_bn, check_reiterable, gather, load
from nvmlib.nn.sharded import (
    ShardedPosterior,
    distribution,
    is_sharded,
    local_shards,
    rank_dir,
    unwrap,
    world,
    write_layout,
)
from nvmlib.nn.staging import host_dtype, make_stager
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import check_deviations
from nvmlib.posterior.sampling import Draws

BUDGET_FRACTION = 0.25  # of the memory available: the default memory_budget of the drawn models
SCRATCH_TIERS = ("mmap", "zarr", "pmem")  # tiers whose draws go to a scratch store of their kind


def memory_budget_bytes(memory_budget: Any) -> float:
    """The bytes drawn models may take in memory: memory_budget, or by default BUDGET_FRACTION of
    the memory available now; InputError for a budget that is not a number >= 0."""
    if memory_budget is None:
        return psutil.virtual_memory().available * BUDGET_FRACTION
    if (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, numbers.Real)
        or not memory_budget >= 0
    ):
        raise InputError(
            f"memory_budget={memory_budget!r}: give the bytes the S drawn parameter "
            "vectors may take in memory (a number >= 0; None: a quarter of the "
            "memory available)"
        )
    return float(memory_budget)


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
            raise TypeError(
                f"parameter {name!r} has dtype {p.dtype}; SWAG needs floating-point parameters: "
                "make it a buffer (register_buffer) if it is not trained"
            )
    if len({p.device for p in params}) > 1:
        raise ConfigError(
            "the model's parameters are on several devices; move the model to one device "
            "(model.to(device)) before wrapping it in SWAG"
        )
    return params


def _place(
    model: nn.Module, path: str | Path | None, distributed: str, write: bool
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
        raise ConfigError(
            "the model's parameters are sharded (FSDP): each rank records its shards under one "
            "directory, so pass a path (a tier with files: mmap, pmem, zarr)"
        )
    tensors, layout = local_shards(model)
    return model, tensors, rank_dir(path, rank, size), layout


class SWAG:
    """A SWAG posterior of `model`'s parameters on a memory tier.

    SWAG(model, tier, path, max_rank=K) creates a new posterior (tier and path as in open_store, or
    store=<Store>); SWAG.open(model, tier, path) reopens one. After each optimizer step call
    collect(). max_rank=None keeps every iterate: pass capacity=<number of collects> then.
    codec="delta-zstd" (or "delta-lz4") stores compressed XOR-deltas of consecutive iterates.
    dtype: how iterates are stored; by default the widest parameter dtype, which holds every
    parameter exactly (a float16 + float32 model stores float32, bfloat16 widens to float32).
    Drawn models keep each parameter's own dtype. moments: where the float64 sums live while
    collecting (SWAGPosterior.create): "device" keeps them on the model's device (a GPU's),
    "store" on the tier (for models whose 40 bytes a parameter do not fit in RAM), "auto" in RAM
    unless they do not fit there.
    deviations="running" centres each kept row on the mean at its collection, as swa_gaussian
    does; "final" (the default) on the mean of all iterates (SWAGPosterior.create).

    Under torch.distributed (distributed="auto", nvmlib.nn.sharded): a DDP model (wrapper unwrapped)
    is recorded by global rank 0 alone, the other ranks only count their collects; a sharded one
    (FSDP2) by every rank, its shards into `path/rank-{r}-of-{n}/`. "local": each process its own.
    """

    def __init__(
        self,
        model: nn.Module,
        tier: str = "dram",
        path: str | Path | None = None,
        *,
        max_rank: int | None = 20,
        capacity: int | None = None,
        store: Store | None = None,
        dtype: str | None = None,
        checkpoint_every: int = 100,
        name: str | None = None,
        overwrite: bool = False,
        codec: str | None = None,
        distributed: str = "auto",
        moments: str = "auto",
        deviations: str = "final",
        **store_options: Any,
    ) -> None:
        check_deviations(deviations)  # before a store or directory is opened, on every rank
        model, params, where, layout = _place(model, path, distributed, write=True)
        if params is None:
            self._setup(model, [], None, False, None)
            return
        if layout is not None and store is not None:
            raise ConfigError(
                "a sharded model's ranks each open their own store: pass tier and path, not store="
            )
        dtype = dtype or str(host_dtype(params)).removeprefix("torch.")
        own = store is None
        store = open_store(tier, where, **store_options) if own else store
        try:
            post = SWAGPosterior.create(
                store,
                sum(p.numel() for p in params),
                max_rank,
                dtype,
                checkpoint_every,
                capacity=capacity,
                model=f"{name or type(model).__name__}#{fingerprint(model)}",
                overwrite=overwrite,
                codec=codec,
                moments=moments,
                device=params[0].device,
                deviations=deviations,
            )
            if layout is not None:
                write_layout(path, layout)
        except BaseException:
            if own:
                store.close()
            raise
        self._setup(model, params, store, own, post)

    @classmethod
    def open(
        cls,
        model: nn.Module,
        tier: str = "dram",
        path: str | Path | None = None,
        *,
        store: Store | None = None,
        readonly: bool = False,
        distributed: str = "auto",
        moments: str = "auto",
        **store_options: Any,
    ) -> "SWAG":
        """Reopen the posterior of `model` at `path` (or on `store`); refused for another
        architecture. The directory of a sharded run opens, read-only, as the posterior of the full
        model."""
        model, params, where, _ = _place(model, path, distributed, write=not readonly)
        self = cls.__new__(cls)
        if params is None:
            self._setup(model, [], None, False, None)
            return self
        n_params = sum(p.numel() for p in params)
        sharded = (
            store is None and where == path and is_sharded(path)
        )  # the ranks' posteriors, in one process
        if sharded and not readonly:
            raise PosteriorError(
                f"{path} holds the per-rank posteriors of a sharded run: open it with "
                "readonly=True to sample it in one process, or for writing from each rank of that "
                "run"
            )
        own = store is None and not sharded
        store = open_store(tier, where, readonly=readonly, **store_options) if own else store
        try:
            post: SWAGPosterior | ShardedPosterior = (
                ShardedPosterior.open(tier, path, n_params, **store_options)
                if sharded
                else SWAGPosterior.open(
                    store,
                    n_params=n_params,
                    readonly=readonly,
                    moments=moments,
                    device=params[0].device,
                )
            )
            stored = post.meta.get("model") or ""
            if "#" in stored and stored.rsplit("#", 1)[1] != fingerprint(model):
                post.close()
                raise PosteriorError(
                    f"the posterior on {post.store.describe()} was made for another architecture "
                    f"({stored.rsplit('#', 1)[0]}, same parameter count, other layer shapes) "
                    f"than this {type(model).__name__}; open it with the model it was made for"
                )
        except BaseException:
            if own:
                store.close()
            raise
        self._setup(model, params, post.store, own, post)
        return self

    def _setup(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        store: Store | None,
        own: bool,
        post: SWAGPosterior | ShardedPosterior | None,
    ) -> None:
        """post None: a replica rank, which records nothing and counts its collects in _idle."""
        self.model = model
        self.store = store
        self._own_store = own
        self._post = post
        self._idle = 0
        self._stager = None
        if post is not None and not post.readonly:
            kept = np.dtype(str(host_dtype(params)).removeprefix("torch."))
            same = isinstance(post, SWAGPosterior) and post.dtype == kept  # flatten into its row
            self._stager = make_stager(params, post.update, post.update_from if same else None)
        self._until_checkpoint: int | None = None
        self._work: nn.Module | None = None  # the copy predict loads each drawn model into

    # ---- collecting ---------------------------------------------------------------------
    def collect(self) -> bool:
        """Record the model's parameters now as one iterate; True when this took a checkpoint of
        every iterate collected so far, a point to save a train state at and resume from. The
        checkpoint is written behind training and durable once the next one, flush() or close()
        has waited for it (which raise what failed): a power loss while it is written rebuilds
        the posterior from the checkpoint before, so keep the train state of the True before as
        well (nvmlib train does). On a GPU the copy is asynchronous, except for an update that
        checkpoints, which waits so that its checkpoint holds this iterate."""
        if self._post is None:  # a replica: global rank 0 records these parameters
            self._idle += 1
            return False
        if self._stager is None:
            raise PosteriorError(
                "this SWAG was opened read-only; open it with readonly=False to collect"
            )
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
            raise PosteriorError(
                f"rank {world()[0]} records nothing: the parameters are replicated (DDP), so "
                "global rank 0 writes the posterior; use it there, or open it after training with "
                "SWAG.open(model, tier, path, readonly=True)"
            )
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
        """Roll back to the first `count` iterates, e.g. to resume training from a checkpoint taken
        then."""
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

    def _check_bn(self, bn_loader: Loader | None, update_bn: bool) -> None:
        check_bn(self.model, bn_loader, update_bn)

    def sample(self, S: int, scale: float = 0.5, seed: int | None = None) -> np.ndarray:
        """S parameter vectors (S, n_params) float32 from one streamed pass over the log."""
        return self.posterior.sample(S, scale=scale, seed=seed)

    @contextmanager
    def _drawn(
        self, S: int, scale: float, seed: int | None, memory_budget: Any, executor: Any = None
    ) -> Iterator[np.ndarray | Draws]:
        """The S draws of one pass over the log: in memory when S × n_params float32 fit
        memory_budget (memory_budget_bytes), else written to a scratch store beside the posterior
        (same tier kind, a new directory next to its path, removed at the end) and read a row at
        a time. A posterior without a directory (dram, a URL) or of a sharded run draws in
        memory."""
        budget = memory_budget_bytes(memory_budget)
        post = self.posterior
        path = None if self.store is None else self.store.path
        if S * post.n_params * 4 <= budget or path is None or not isinstance(post, SWAGPosterior):
            yield post.sample(S, scale=scale, seed=seed, executor=executor)
            return
        kind = self.store.kind if self.store.kind in SCRATCH_TIERS and path.is_dir() else "mmap"
        beside = path.parent if path.is_dir() else Path(tempfile.gettempdir())  # a device: /tmp
        where = beside / f".{path.name}.draws-{uuid.uuid4().hex[:12]}"
        store = open_store(kind, where)
        try:
            yield post.sample(S, scale=scale, seed=seed, executor=executor, out=store)
        finally:
            store.close()
            shutil.rmtree(where, ignore_errors=True)

    def sample_models(
        self,
        S: int,
        bn_loader: Loader | None = None,
        scale: float = 0.5,
        seed: int | None = None,
        update_bn: bool = True,
        memory_budget: float | None = None,
    ) -> Iterator[nn.Module]:
        """S distinct models drawn from one pass over the log, each a new copy of the wrapped model
        (which is never changed) in eval mode, its BatchNorm statistics recomputed on bn_loader:
        list() of them holds S models' memory. Draws larger than memory_budget (bytes; default a
        quarter of the memory available) go to a scratch store beside the posterior, removed
        once the models are all drawn (or the iterator is dropped)."""
        self._check_bn(bn_loader, update_bn)
        scratch = ExitStack()
        thetas = scratch.enter_context(self._drawn(S, scale, seed, memory_budget))  # the pass, now

        def models() -> Iterator[nn.Module]:
            try:
                for theta in thetas:
                    yield load(self._copy(), theta, bn_loader, update_bn)
            finally:
                scratch.close()

        drawn = models()
        weakref.finalize(drawn, scratch.close)
        return drawn

    def mean_model(self, bn_loader: Loader | None = None, update_bn: bool = True) -> nn.Module:
        """The SWA solution θ̄ as a new model (BatchNorm statistics recomputed on bn_loader)."""
        self._check_bn(bn_loader, update_bn)
        return load(self._copy(), self.posterior.mean(), bn_loader, update_bn)

    def predict(
        self,
        loader: Loader,
        S: int = 30,
        bn_loader: Loader | None = None,
        scale: float = 0.5,
        seed: int | None = 0,
        update_bn: bool = True,
        executor: Any = None,
        memory_budget: float | None = None,
    ) -> np.ndarray:
        """Bayesian model average: softmax probabilities (N, classes) float64 averaged over S
        models.

        The S drawn parameter vectors stay in memory when they fit memory_budget (bytes; default a
        quarter of the memory available), else they go to a scratch store beside the posterior and
        the models are loaded one draw at a time (sample_models).

        executor: nvmlib.dask.DaskExecutor(client); the S models' BatchNorm refreshes and
        predictions then run on its workers (the loaders are gathered into tensors and sent once),
        and a posterior on a tier the workers can open (Store.shared: zarr) is also sampled there.
        The result equals the local one to float rounding."""
        self._check_bn(bn_loader, update_bn)
        check_reiterable(loader, "loader")
        shared = executor if executor is not None and self.store.shared else None
        with self._drawn(S, scale, seed, memory_budget, shared) as thetas:
            if executor is not None:
                bn = gather(bn_loader, "bn_loader") if update_bn and bn_loader is not None else None
                return executor.bma(self.model, thetas, {"x": gather(loader)}, bn, update_bn)["x"]
            if self._work is None:
                self._work = self._copy()
            try:
                return bma(self._work, thetas, {"x": loader}, bn_loader, update_bn)["x"]
            except BaseException:
                self._work = None  # a failed BatchNorm refresh leaves its momenta unset
                raise

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
