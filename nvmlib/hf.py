"""SWAG in a Hugging Face Trainer run, in one line (extra: pip install nvmlib[hf]):

    transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[
        SWAGCallback("mmap", path, max_rank=20, start_epoch=1, every_n_steps=2)]).train()

The rule of what is collected, and resuming, are nvmlib.nn.collect's: the step is state.global_step
at on_step_end, its epoch the one it runs in (state.epoch reaches 1.0 on the last step of epoch 0).
The count collected is saved with the Trainer's checkpoints (the callback is an ExportableState);
resuming needs TrainingArguments(restore_callback_states_from_checkpoint=True), with which the
Trainer replaces the callback by a restored copy: find it in trainer.callback_handler.callbacks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from nvmlib.errors import ConfigError
from nvmlib.nn.collect import Collector

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - the extra is installed by make setup
    raise ImportError("nvmlib.hf needs Hugging Face transformers: pip install nvmlib[hf]") from exc


class SWAGCallback(Collector, TrainerCallback, ExportableState):
    """Collect the model's parameters into cb.swag (an nvmlib.SWAG): after the optimizer step whose
    state.global_step is a multiple of every_n_steps, in epochs >= start_epoch. Other keywords go
    to SWAG(...) (max_rank, dtype, codec, overwrite, ...); saved with the checkpoint, so they must
    be plain values (numbers, strings)."""

    def __init__(
        self,
        tier: str = "dram",
        path: str | Path | None = None,
        *,
        start_epoch: int = 0,
        every_n_steps: int = 1,
        **swag_options: Any,
    ) -> None:
        super().__init__(
            tier, path, start_epoch=start_epoch, every_n_steps=every_n_steps, **swag_options
        )
        self._args = {
            "tier": tier,
            "path": None if path is None else str(path),
            "start_epoch": start_epoch,
            "every_n_steps": every_n_steps,
            **swag_options,
        }

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if state.global_step > 0 and self.resume_count is None and self.swag is None:
            raise ConfigError(
                f"this run resumes at step {state.global_step}, but the SWAG callback's saved "
                "count was not restored: pass "
                "TrainingArguments(restore_callback_states_from_checkpoint=True) so that the "
                "posterior is rolled back to the checkpoint"
            )
        self.start(model, state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.step(state.global_step, math.ceil(state.epoch) - 1)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.swag is not None:
            self.swag.flush()

    def state(self) -> dict:
        return {"args": self._args, "attributes": {"resume_count": self.saved()}}
