"""One rank of the torch.distributed runs of tests/test_ddp.py, started by torchrun (gloo,
loopback).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py OUT

Runs, in this order: plain DistributedDataParallel with nvmlib.SWAG, FSDP2 (fully_shard) with
nvmlib.SWAG, and Lightning fits with the callback under strategy="ddp" and under
ModelParallelStrategy (fully_shard); each rank writes what it saw to OUT/<run>-rank<r>.npz, with
the full parameter vector after every optimizer step (float64) as the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nvmlib import SWAG
from nvmlib.errors import PosteriorError

STEPS = 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))  # 7 and 3 rows: uneven shards


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(4, 5, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def flat(model: nn.Module) -> np.ndarray:
    """The full parameter vector (gathering shards: a collective on every rank)."""
    parts = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in parts]).double().numpy()


def train(model: nn.Module, swag: SWAG, rank: int) -> list[np.ndarray]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = []
    for step in range(STEPS):
        x, y = batch(rank, step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        swag.collect()
        ref.append(flat(model))
    return ref


def run_ddp(out: Path, rank: int) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_model())
    swag = SWAG(
        ddp, "mmap", out / "ddp", max_rank=20
    )  # rank 1 writes nothing, no second-writer error
    ref = train(ddp, swag, rank)
    result = {"n_collected": swag.n_collected, "records": swag.records, "ref": np.array(ref)}
    if swag.records:
        result["mean"] = swag.posterior.mean()
    else:
        try:
            _ = swag.posterior  # raises: nothing was recorded
        except PosteriorError as exc:
            result["error"] = str(exc)
    swag.close()
    np.savez(out / f"ddp-rank{rank}.npz", **result)


def run_fsdp(out: Path, rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    swag = SWAG(model, "mmap", out / "fsdp", max_rank=4)  # a ring: 6 iterates, the last 4 kept
    ref = train(model, swag, rank)
    draw = swag.sample(3, seed=7)  # this rank's shards of 3 draws
    np.savez(
        out / f"fsdp-rank{rank}.npz", n_collected=swag.n_collected, ref=np.array(ref), draw=draw
    )
    swag.close()


class Tiny(pl.LightningModule):
    """make_model() recording its full parameter vector after every optimizer step; `shard`: FSDP2
    (fully_shard on the strategy's data-parallel mesh) in configure_model."""

    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.net = make_model()
        self.shard = shard
        self.ref: list[np.ndarray] = []

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for module in (self.net[0], self.net[2], self.net):
                fully_shard(module, mesh=mesh)

    def training_step(self, b, i):
        return nn.functional.cross_entropy(self.net(b[0]), b[1])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ref.append(flat(self))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def run_lightning(out: Path, rank: int, shard: bool = False) -> None:
    """strategy="ddp", or (shard) ModelParallelStrategy with fully_shard."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from nvmlib.lightning import SWAGCallback

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, generator=g)
    loader = DataLoader(
        TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4
    )  # 3 steps per rank and epoch
    model = Tiny(shard)
    name = "lightning-fsdp" if shard else "lightning"
    cb = SWAGCallback("mmap", out / name, max_rank=20, start_epoch=1, every_n_steps=2)
    strategy = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if shard else "ddp"
    )
    pl.Trainer(
        max_epochs=3,
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(model, loader)
    result = {
        "n_collected": cb.swag.n_collected,
        "records": cb.swag.records,
        "ref": np.array(model.ref),
    }
    if cb.swag.records and not shard:
        result["mean"] = cb.swag.posterior.mean()
    cb.swag.close()
    np.savez(out / f"{name}-rank{rank}.npz", **result)


def run_lightning_fsdp(out: Path, rank: int) -> None:
    run_lightning(out, rank, shard=True)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for run in (run_ddp, run_fsdp, run_lightning, run_lightning_fsdp):
        run(out, rank)
        dist.barrier()


if __name__ == "__main__":
    main()
