"""Getting a model's parameters into the posterior without stalling training.

On the CPU an iterate is flattened into one reused buffer and handed to the posterior, which
writes its row behind the next training step. On a GPU a host copy per step would stall the
device, so iterates go through a ring of `depth` slots: the training stream flattens the
parameters into the slot's device buffer, a side stream copies that into the slot's pinned host
buffer, and a writer thread waits for the copy's event and records the host buffer. The slot is
reused only after the writer is done with it, so training runs ahead by up to `depth` iterates.
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Callable, Sequence

import numpy as np
import torch

from nvmlib.errors import InputError

NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def host_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The widest of the parameters' dtypes, which holds each of them exactly (float16 + float32:
    float32), when numpy has it, else float32 (bfloat16 and float8 widen exactly)."""
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    return dtype if dtype in NUMPY_FLOATS else torch.float32


def flatten_into(params: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The parameters, concatenated into `out` (one copy, no allocation), each cast to out's
    dtype."""
    with torch.no_grad():
        torch.cat([p.detach().reshape(-1) for p in params], out=out)
    return out


def unflatten_into(theta: np.ndarray | torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Copy the flat vector `theta` into `params` in place, each slice cast to its parameter's
    own dtype and device (the inverse of flatten_into)."""
    params = list(params)
    vec = torch.from_numpy(np.ascontiguousarray(theta)) if isinstance(theta, np.ndarray) else theta
    n = sum(p.numel() for p in params)
    if tuple(vec.shape) != (n,):
        raise InputError(
            f"θ has shape {tuple(vec.shape)} but the model has {n} parameters: "
            "pass a flat vector of this model's posterior"
        )
    vec, at = vec.to(params[0].device), 0  # one transfer to a GPU model
    with torch.no_grad():
        for p in params:
            p.copy_(vec[at : at + p.numel()].view_as(p))
            at += p.numel()


class HostStager:
    """CPU models: flatten straight into the posterior's staged row (`record_from`, when the log
    keeps the parameters' dtype), else into one reused buffer, and record it at once."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        record: Callable[[np.ndarray], bool],
        record_from: Callable[[Callable[[np.ndarray], None]], bool] | None = None,
    ) -> None:
        self.params = list(params)
        self.record, self.record_from = record, record_from
        n = sum(p.numel() for p in self.params)
        self.buffer = None if record_from else torch.empty(n, dtype=host_dtype(self.params))

    def stage(self, sync: bool = False) -> bool:
        """Record the parameters now; whether the posterior wrote a checkpoint."""
        if self.record_from is not None:
            return self.record_from(lambda row: flatten_into(self.params, torch.from_numpy(row)))
        return self.record(flatten_into(self.params, self.buffer).numpy())

    def drain(self) -> None:
        """Nothing is in flight on the CPU."""

    def close(self) -> None:
        """Nothing to release."""


class CudaStager:
    """CUDA models: device buffer → pinned host buffer on a side stream → writer thread."""

    def __init__(
        self, params: Sequence[torch.Tensor], record: Callable[[np.ndarray], bool], depth: int = 4
    ) -> None:
        self.params = list(params)
        self.record = record
        n = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.stream = torch.cuda.Stream(self.device)
        dtype = host_dtype(self.params)
        self.dev = [torch.empty(n, dtype=dtype, device=self.device) for _ in range(depth)]
        self.host = [torch.empty(n, dtype=dtype, pin_memory=True) for _ in range(depth)]
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(depth):
            self.free.put(slot)
        self.todo: queue.Queue[tuple[int, torch.cuda.Event] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.writer = threading.Thread(target=self._write, name="nvmlib-cuda-writer", daemon=True)
        self.writer.start()

    def stage(self, sync: bool = False) -> bool:
        """Queue the parameters' copy; with sync, wait until they are recorded and return whether
        the posterior wrote a checkpoint (asynchronous stages return False)."""
        self._raise()
        slot = self.free.get()  # blocks while `depth` iterates are in flight: back-pressure
        self._raise()
        flatten_into(self.params, self.dev[slot])  # on the training stream, device bandwidth
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.host[slot].copy_(self.dev[slot], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        if not sync:
            self.todo.put((slot, done))
            return False
        self.drain()
        done.synchronize()
        try:
            return self.record(self.host[slot].numpy())
        finally:
            self.free.put(slot)

    def _write(self) -> None:
        while (item := self.todo.get()) is not None:
            slot, done = item
            try:
                if self.error is None:
                    done.synchronize()
                    self.record(self.host[slot].numpy())
            except BaseException as exc:  # surfaced at the next stage/drain
                self.error = exc
            finally:
                self.free.put(slot)
                self.todo.task_done()
        self.todo.task_done()

    def drain(self) -> None:
        """Wait until every queued iterate is recorded; raise the writer's error if one failed."""
        self.todo.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        """Record what is queued, then stop the writer."""
        try:
            self.drain()
        finally:
            self.todo.put(None)
            self.writer.join()


def make_stager(
    params: Sequence[torch.Tensor],
    record: Callable[[np.ndarray], bool],
    record_from: Callable[[Callable[[np.ndarray], None]], bool] | None = None,
) -> HostStager | CudaStager:
    """The stager for where the parameters live (record_from: as HostStager's)."""
    if params[0].device.type == "cuda":
        return CudaStager(params, record)
    return HostStager(params, record, record_from)
