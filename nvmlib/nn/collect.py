"""What the training-loop callbacks (nvmlib.lightning, nvmlib.hf) share: when to collect, and
how a resumed run rolls its posterior back to the checkpoint it resumes from.

An iterate is collected right after the optimizer step whose global step count (optimizer steps
so far, this one included) is a multiple of `every_n_steps`, in epochs >= `start_epoch` (0-based).
A checkpoint saves the number of iterates collected; a run resumed from it reopens the posterior
at the same path and truncates it to that number, so it equals an uninterrupted run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from nvmlib.errors import InputError, PosteriorError
from nvmlib.nn.swag import SWAG


def _count(name: str, value: Any, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise InputError(f"{name}={value!r}: pass an integer >= {least}")
    return value


class Collector:
    """Collects a model's parameters into an nvmlib.SWAG (`self.swag`) by the rule above."""

    def __init__(
        self,
        tier: str = "dram",
        path: str | Path | None = None,
        *,
        start_epoch: int = 0,
        every_n_steps: int = 1,
        **swag_options: Any,
    ) -> None:
        self.tier = tier
        self.path = path
        self.start_epoch = _count("start_epoch", start_epoch, 0)
        self.every_n_steps = _count("every_n_steps", every_n_steps, 1)
        self.swag_options = swag_options
        self.swag: SWAG | None = None
        self.resume_count: int | None = (
            None  # iterates collected up to the checkpoint being resumed
        )
        self._last_step = 0

    def start(self, model: nn.Module, global_step: int) -> None:
        """Before the first training step: a new posterior, or (resuming) the one at `path` rolled
        back to the checkpoint's count; every mismatch is refused here, before training."""
        count, self.resume_count = self.resume_count, None
        self._last_step = global_step
        if self.swag is None:
            if count is None:
                self.swag = SWAG(model, self.tier, self.path, **self.swag_options)
                return
            self.swag = SWAG.open(model, self.tier, self.path)
        if count is None:
            return
        if self.swag.records and self.swag.n_collected < count:
            n = self.swag.n_collected
            self.swag.close()
            self.swag = None
            raise PosteriorError(
                f"the checkpoint being resumed counted {count} collected iterates, but the "
                f"posterior at {self.path} holds {n}: they do not belong together; resume "
                "from a checkpoint of the run that wrote this posterior, or point the callback "
                "at that run's posterior path"
            )
        self.swag.truncate(count)

    def step(self, global_step: int, epoch: int) -> bool:
        """After an optimizer step: collect if the rule says so; whether it did."""
        due = (
            global_step != self._last_step
            and global_step % self.every_n_steps == 0
            and epoch >= self.start_epoch
        )
        self._last_step = global_step
        if due:
            assert self.swag is not None, "start() runs before the first step"
            self.swag.collect()
        return due

    def saved(self) -> int:
        """For a checkpoint: everything collected is made durable; the count to resume to."""
        if self.swag is None:
            return 0
        self.swag.flush()
        return self.swag.n_collected
