"""SWAG in a PyTorch Lightning run, in one line (extra: pip install nvmlib[lightning]):

    cb = SWAGCallback("mmap", "/mnt/nvme0/run1", max_rank=20, start_epoch=1, every_n_steps=2)
    lightning.Trainer(max_epochs=3, callbacks=[cb]).fit(module, train_loader)
    cb.swag.predict(test_loader, S=30, bn_loader=train_loader)

The rule of what is collected, and resuming, are nvmlib.nn.collect's. Under strategy="ddp" global
rank 0 records the (replicated) parameters; under ModelParallelStrategy (fully_shard) every rank
records its shards (nvmlib.nn.sharded). cb.swag stays open after fit: close it when done.
"""

from __future__ import annotations

from typing import Any

from nvmlib.errors import ConfigError
from nvmlib.nn.collect import Collector

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the extra is installed by make setup
    raise ImportError(
        "nvmlib.lightning needs PyTorch Lightning: pip install nvmlib[lightning]"
    ) from exc


class SWAGCallback(Collector, pl.Callback):
    """Collect the LightningModule's parameters into cb.swag (an nvmlib.SWAG): after the optimizer
    step whose trainer.global_step is a multiple of every_n_steps, in epochs >= start_epoch.
    Other keywords go to SWAG(...) (max_rank, dtype, codec, overwrite, ...)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            raise ConfigError(
                "strategy='fsdp' (FSDP1) flattens parameters, which SWAG cannot map back to the "
                "model: use lightning's ModelParallelStrategy with "
                "torch.distributed.fsdp.fully_shard in configure_model (FSDP2), or strategy='ddp'"
            )
        self.start(pl_module, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.step(trainer.global_step, trainer.current_epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.swag is not None:
            self.swag.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"n_collected": self.saved()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_count = int(state_dict["n_collected"])
