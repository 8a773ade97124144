"""The moments on a torch device (`moments="device"`): the float64 sums of a CUDA model's
posterior stay on its GPU, so that the host thread only writes rows and checkpoints.

The same arithmetic as the host kernels, d = θ − θ₀ in float64 then Σd and Σd², as torch
operations on the device; a checkpoint copies the sums to the host. Runs on CPU tensors too.
"""

from __future__ import annotations

import numpy as np
import torch

from nvmlib.posterior.moments import Moments


class TorchMoments(Moments):
    """[Σ(θ−θ₀), Σ(θ−θ₀)²] as a (2, padded) float64 tensor on `device`."""

    def __init__(self, n_params: int, padded: int, device: torch.device | str) -> None:
        super().__init__(n_params, padded)
        self.device = torch.device(device)
        self.block = torch.zeros((2, padded), dtype=torch.float64, device=self.device)
        self._shift = torch.zeros(n_params, dtype=torch.float64, device=self.device)

    def set_shift(self, values: np.ndarray) -> None:
        super().set_shift(values)
        self._shift.copy_(torch.from_numpy(self.shift))

    def add_rows(self, rows: np.ndarray, first: int = 0, count: int | None = None) -> None:
        """Add stored rows, each copied to the device once, then the float64 sums there."""
        count = len(rows) if count is None else count
        for r in range(first, first + count):
            d = torch.from_numpy(rows[r % len(rows)]).to(self.device, torch.float64) - self._shift
            self.block[0, : self.n_params].add_(d)
            self.block[1, : self.n_params].add_(d * d)

    def sums(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.block[:, a:b].cpu().numpy()
        return s[0], s[1]

    def snapshot(self, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return self.block.cpu().numpy()
        torch.from_numpy(out).copy_(self.block)
        return out

    def load(self, block: np.ndarray) -> None:
        self.block.copy_(torch.from_numpy(np.ascontiguousarray(block, np.float64)))

    def close(self) -> None:
        super().close()
        self.block = self.block.new_empty((2, 0))
        self._shift = self._shift.new_empty(0)
