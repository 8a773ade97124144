"""Posteriors of models trained on several processes (torch.distributed).

- replicated parameters (DDP): every rank holds the same iterate, so global rank 0 records it and
  the other ranks record nothing;
- sharded parameters (FSDP2's fully_shard: DTensors sharded on dim 0 of a 1-D mesh): each rank
  records its local shards into its own posterior, `<path>/rank-{r}-of-{n}/`, and writes the
  layout of its shards beside it (`rank-{r}-of-{n}.json`). ShardedPosterior opens the directory
  in one process as the posterior of the full parameter vector: mean, variance and kept rows are
  those of the full vectors, and sample() equals that of a single-process posterior of the same
  iterates (z₁ and z₂ come from the seed alone, nvmlib.posterior.sampling.draw).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nvmlib.backends import open_store
from nvmlib.errors import ConfigError, PosteriorError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.sampling import draw

MODES = ("auto", "local", "replicated", "sharded")


def world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel (or DataParallel) wrapper trains."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_dtensor(p: torch.Tensor) -> bool:
    """Whether `p` is a DTensor (a sharded parameter); torch.distributed.tensor is not imported for
    this (2 s): no tensor is a DTensor before something else imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def distribution(model: nn.Module, mode: str = "auto") -> str:
    """How `model`'s parameters are spread over the processes: "sharded" (DTensor parameters,
    FSDP2), "replicated" (a DDP wrapper, or any model in a torch.distributed run of several
    processes) or "local" (one process; every process writes its own posterior)."""
    if mode not in MODES:
        raise ConfigError(f"distributed={mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if any(is_dtensor(p) for p in model.parameters()):
        return "sharded"
    if isinstance(model, nn.parallel.DistributedDataParallel) or world()[1] > 1:
        return "replicated"
    return "local"


def rank_dir(root: str | Path, rank: int, size: int) -> Path:
    """Where rank `rank` of `size` keeps its shards' posterior."""
    return Path(root) / f"rank-{rank}-of-{size}"


def local_shards(model: nn.Module) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """This rank's part of every parameter (a view that the optimizer updates in place) and the
    layout: per parameter its name, global shape, and the dim-0 rows [offset, offset + rows) held
    here. A plain (replicated) parameter is held whole by rank 0 and by no other rank."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    rank, _ = world()
    tensors, layout = [], []
    for name, p in model.named_parameters():
        if is_dtensor(p):
            if p.device_mesh.ndim != 1 or p.placements[0] != Shard(0):
                raise ConfigError(
                    f"parameter {name!r} is placed as {p.placements} on a {p.device_mesh.ndim}-D "
                    "mesh; nvmlib records shards on dim 0 of a 1-D mesh (fully_shard's default): "
                    "shard the model with fully_shard(model) on one mesh dimension"
                )
            shape, offset = compute_local_shape_and_global_offset(
                p.shape, p.device_mesh, p.placements
            )
            local, start, rows = (
                p.to_local(),
                int(offset[0]) if p.dim() else 0,
                int(shape[0]) if p.dim() else 1,
            )
        elif rank == 0:
            local, start, rows = p.detach(), 0, p.shape[0] if p.dim() else 1
        else:
            layout.append({"name": name, "shape": list(p.shape), "offset": 0, "rows": 0})
            continue
        tensors.append(local)
        layout.append({"name": name, "shape": list(p.shape), "offset": start, "rows": rows})
    return tensors, layout


def write_layout(root: str | Path, layout: list[dict[str, Any]]) -> None:
    """Record this rank's shard layout beside its posterior (atomically)."""
    rank, size = world()
    final = Path(root) / f"rank-{rank}-of-{size}.json"
    tmp = final.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"rank": rank, "world": size, "params": layout}))
    os.replace(tmp, final)


def is_sharded(root: str | Path | None) -> bool:
    """Whether `root` holds the per-rank posteriors of a sharded run."""
    return root is not None and Path(root).is_dir() and any(Path(root).glob("rank-*-of-*.json"))


class ShardedPosterior:
    """The per-rank posteriors of one sharded run, read in one process as the posterior of the
    full parameter vector (in model.parameters() order, each parameter flattened)."""

    def __init__(
        self, posts: list[SWAGPosterior], segments: list[tuple[int, int, int, int]], n_params: int
    ) -> None:
        self.posts = posts
        self.segments = segments  # (rank, local start, global start, length)
        self.n_params = n_params
        self.store = posts[0].store
        self.meta = posts[0].meta
        self.readonly = True
        self.work_dtype = posts[0].work_dtype
        counts = {post.n_collected for post in posts}
        if len(counts) > 1:
            raise PosteriorError(
                f"the ranks' posteriors hold {sorted(post.n_collected for post in posts)} "
                "iterates: the run stopped between two ranks' collects; resume it from its last "
                "checkpoint (the callback truncates every rank to the checkpoint's count)"
            )

    @classmethod
    def open(
        cls, tier: str, root: str | Path, n_params: int | None = None, **store_options: Any
    ) -> "ShardedPosterior":
        """Every rank's posterior under `root`, read-only."""
        layouts = [json.loads(p.read_text()) for p in sorted(Path(root).glob("rank-*-of-*.json"))]
        size = layouts[0]["world"]
        if sorted(lay["rank"] for lay in layouts) != list(range(size)) or any(
            lay["world"] != size for lay in layouts
        ):
            raise PosteriorError(
                f"{root} holds the shards of ranks {sorted(lay['rank'] for lay in layouts)}, not "
                f"of all {size}: copy every rank-*-of-{size} directory and .json file there"
            )
        layouts.sort(key=lambda lay: lay["rank"])
        segments, total = cls._segments(layouts)
        if n_params is not None and total != n_params:
            raise PosteriorError(
                f"the sharded posterior in {root} holds {total} parameters, not {n_params}: it "
                "belongs to another model; open the right path"
            )
        posts: list[SWAGPosterior] = []
        try:
            for rank in range(size):
                store = open_store(tier, rank_dir(root, rank, size), readonly=True, **store_options)
                try:
                    posts.append(SWAGPosterior.open(store, readonly=True))
                except BaseException:
                    store.close()
                    raise
            return cls(posts, segments, total)
        except BaseException:
            for post in posts:
                post.close()
                post.store.close()
            raise

    @staticmethod
    def _segments(layouts: list[dict[str, Any]]) -> tuple[list[tuple[int, int, int, int]], int]:
        """Where each rank's local vector lies in the full one, and the full length."""
        segments, cursor = [], [0] * len(layouts)
        start = 0
        for i, param in enumerate(layouts[0]["params"]):
            shape = param["shape"]
            inner = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            for lay in layouts:
                p = lay["params"][i]
                if p["name"] != param["name"] or p["shape"] != shape:
                    raise PosteriorError(
                        f"rank {lay['rank']}'s shards are of parameter {p['name']} {p['shape']}, "
                        f"rank 0's of {param['name']} {shape}: the ranks ran different models"
                    )
                if p["rows"]:
                    n = p["rows"] * inner
                    segments.append(
                        (lay["rank"], cursor[lay["rank"]], start + p["offset"] * inner, n)
                    )
                    cursor[lay["rank"]] += n
            start += int(np.prod(shape)) if shape else 1
        return segments, start

    def _full(self, parts: list[np.ndarray | torch.Tensor]) -> np.ndarray:
        """The full-vector array (last axis) from each rank's local array."""
        first = np.asarray(parts[0])
        out = np.empty(first.shape[:-1] + (self.n_params,), first.dtype)
        for rank, local, start, n in self.segments:
            out[..., start : start + n] = np.asarray(parts[rank])[..., local : local + n]
        return out

    def _local(self, full: np.ndarray, rank: int) -> np.ndarray:
        """Rank `rank`'s part of a full vector."""
        return np.concatenate(
            [full[g : g + n] for r, _, g, n in self.segments if r == rank] or [full[:0]]
        )

    @property
    def n_collected(self) -> int:
        return self.posts[0].n_collected

    @property
    def rank(self) -> int:
        return self.posts[0].rank

    def mean(self) -> np.ndarray:
        return self._full([post.mean() for post in self.posts])

    def variance(self) -> np.ndarray:
        return self._full([post.variance() for post in self.posts])

    def kept_rows(self) -> np.ndarray:
        return self._full([post.kept_rows() for post in self.posts])

    def low_rank(self, coef: torch.Tensor, mean: np.ndarray) -> torch.Tensor:
        """Σ_k cₖ (θ_k − θ̄) of the full vectors: each rank's part with the same coefficients
        (sampling.coefficients of z₂: D z₂, centred as the ranks' posteriors say)."""
        parts = [
            post.low_rank(coef, self._local(mean, r)).numpy() for r, post in enumerate(self.posts)
        ]
        return torch.from_numpy(self._full(parts))

    def sample(
        self, S: int, scale: float = 0.5, seed: int | None = None, executor: Any = None
    ) -> np.ndarray:
        """S full parameter vectors, equal to those of one posterior of the same iterates and
        seed."""
        if executor is not None:
            raise ConfigError("a sharded posterior is sampled in this process: pass executor=None")
        return draw(
            S,
            scale,
            seed,
            self.mean(),
            self.variance(),
            self.rank,
            self.work_dtype,
            self.low_rank,
            count=self.n_collected,
            deviations=self.posts[0].deviations,
        )

    def close(self) -> None:
        for post in self.posts:
            post.close()
            post.store.close()

    def __repr__(self) -> str:
        return (
            f"<ShardedPosterior n_params={self.n_params} of {len(self.posts)} ranks "
            f"n_collected={self.n_collected}>"
        )
