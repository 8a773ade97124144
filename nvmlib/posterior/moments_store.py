"""The moments on the posterior's tier (`moments="store"`): for models whose float64 sums (16
bytes a parameter) and first iterate (8) do not fit in RAM.

The live sums are a scratch array on the store (LIVE), θ₀ is the tier's SHIFT itself. Rows are
added a block of parameters at a time (the block's sums and θ₀ read, the rows added in order by
the host kernel, the sums written back), a checkpoint copies LIVE into its MOMENTS slot block by
block while digesting it, and recovery copies a slot back: RAM holds a few blocks, whatever the
model's size. The bits are those of HostMoments (the same kernel, the same order per element). On
the mmap tier these ranges go through the page cache, which keeps them while memory allows
(outside the process's resident set). A read-only posterior keeps its moments in RAM.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from nvmlib.backends.base import Store, aligned_empty
from nvmlib.posterior.checksum import Digest
from nvmlib.posterior.layout import LIVE, MOMENTS, SAVED, SHIFT
from nvmlib.posterior.moments import Moments, add_rows

PART = 1 << 20  # parameters per block: 8 MB of each sum


class StoreMoments(Moments):
    """[Σ(θ−θ₀), Σ(θ−θ₀)²] as LIVE (2 × padded,) float64 on `store`; θ₀ as its SHIFT."""

    FROZEN = False

    def __init__(self, store: Store, n_params: int, padded: int) -> None:
        self.n_params, self.padded = n_params, padded
        self.store = store
        for name, size in ((LIVE, 2 * padded), (SAVED, 2 * padded + n_params)):  # scratch_bytes
            if name not in store or store.shape(name) != (size,):
                if name in store:
                    store.delete(name)
                store.create(name, (size,), "float64")  # a tier without room refuses here
        # the adder's three (the moments' thread), and one for copies (a caller's thread, while
        # the moments' thread is idle, or that thread itself)
        self._buffers = [aligned_empty((min(PART, 2 * padded),), np.float64) for _ in range(4)]
        self._shift_digest: tuple[int, int] | None = None  # (digest, seed) of the tier's θ₀

    @staticmethod
    def scratch_bytes(meta: dict) -> int:
        """Bytes of LIVE and SAVED on the tier for a posterior of `meta`."""
        m, n = meta["moments_len"], meta["n_params"]
        return 8 * (2 * m + 2 * m + n)

    # ---- blocks ----------------------------------------------------------------------------
    def _blocks(self, n: int | None = None) -> Iterator[tuple[int, int]]:
        n = self.n_params if n is None else n
        for a in range(0, n, PART):
            yield a, min(n, a + PART)

    def _copy(
        self,
        src: str,
        s0: int,
        dst: str,
        d0: int,
        n: int,
        check: Digest | None = None,
        buf: np.ndarray | None = None,
    ) -> None:
        """Elements s0..s0+n−1 of array `src` into dst's d0.., a block at a time (digested), through
        `buf` (by default the copies' buffer)."""
        buf = self._buffers[3] if buf is None else buf
        for a, b in self._blocks(n):
            part = self.store.read_flat(src, s0 + a, s0 + b, buf[: b - a])
            if check is not None:
                check.update(part)
            self.store.write_flat(dst, d0 + a, part)

    def _slot_parts(self, slot: int) -> list[tuple[int, int]]:
        """(offset in MOMENTS, offset in LIVE) of the slot's two sums."""
        m = self.padded
        return [((2 * slot + i) * m, i * m) for i in range(2)]

    # ---- the Moments interface --------------------------------------------------------------
    def add_rows(self, rows: np.ndarray, first: int = 0, count: int | None = None) -> None:
        count = len(rows) if count is None else count
        if not count:
            return
        m, (b1, b2, b3, _) = self.padded, self._buffers
        for a, b in self._blocks():
            s1 = self.store.read_flat(LIVE, a, b, b1[: b - a])
            s2 = self.store.read_flat(LIVE, m + a, m + b, b2[: b - a])
            shift = self.store.read_flat(SHIFT, a, b, b3[: b - a])
            add_rows(rows[:, a:b], shift, s1, s2, first, count)
            self.store.write_flat(LIVE, a, s1)
            self.store.write_flat(LIVE, m + a, s2)

    def sums(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.padded
        return self.store.read_flat(LIVE, a, b), self.store.read_flat(LIVE, m + a, m + b)

    def snapshot(self, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((2, self.padded)) if out is None else out
        m = self.padded
        for i in range(2):
            for a, b in self._blocks(m):
                self.store.read_flat(LIVE, i * m + a, i * m + b, out[i, a:b])
        return out

    def load(self, block: np.ndarray) -> None:
        m = self.padded
        for i in range(2):
            for a, b in self._blocks(m):
                self.store.write_flat(LIVE, i * m + a, np.ascontiguousarray(block[i, a:b]))

    def set_shift(self, values: np.ndarray) -> None:
        for a, b in self._blocks():
            self.store.write_flat(SHIFT, a, np.asarray(values[a:b], np.float64))
        self._shift_digest = None

    def shift_of(self, a: int, b: int) -> np.ndarray:
        return self.store.read_flat(SHIFT, a, b)

    def shift_digest(self, ident: int) -> int:
        """Digested from the tier, once per θ₀ set (the shift changes only at the first update)."""
        if self._shift_digest is None or self._shift_digest[1] != ident:
            self._shift_digest = (self._tier_shift_digest(ident), ident)
        return self._shift_digest[0]

    def _tier_shift_digest(self, ident: int) -> int:
        """Read on whichever thread asks (a checkpoint's), into a buffer of its own."""
        check, buf = Digest(ident), aligned_empty((min(PART, self.n_params),), np.float64)
        for a, b in self._blocks():
            check.update(self.store.read_flat(SHIFT, a, b, buf[: b - a]))
        return check.value()

    def write_shift(self, store: Store) -> None:
        """Nothing to write: θ₀ is the tier's SHIFT already."""

    def read_shift(self, store: Store, ident: int) -> tuple[int, Callable[[], None]]:
        value = self._tier_shift_digest(ident)
        self._shift_digest = value, ident
        return value, lambda: None

    def write_slot(
        self, store: Store, slot: int, ident: int, block: np.ndarray | None = None
    ) -> int:
        """On the moments' thread when written behind training: through a buffer of its own."""
        check, buf = Digest(ident), aligned_empty(self._buffers[3].shape, np.float64)
        for at, live in self._slot_parts(slot):
            self._copy(LIVE, live, MOMENTS, at, self.padded, check, buf)
        return check.value()

    def read_slot(self, store: Store, slot: int, ident: int) -> tuple[int, Callable[[], None]]:
        check = Digest(ident)
        for at, _ in self._slot_parts(slot):
            for a, b in self._blocks(self.padded):
                part = self.store.read_flat(MOMENTS, at + a, at + b, self._buffers[3][: b - a])
                check.update(part)

        def load() -> None:
            for at, live in self._slot_parts(slot):
                self._copy(MOMENTS, at, LIVE, live, self.padded)

        return check.value(), load

    def clear(self) -> None:
        """Zero sums; θ₀ on the tier stays (checkpoints may still refer to it) until the next
        first update sets it."""
        zeros = np.zeros(min(PART, 2 * self.padded))
        for a, b in self._blocks(2 * self.padded):
            self.store.write_flat(LIVE, a, zeros[: b - a])

    def saved(self) -> Any:
        m = self.padded
        self._copy(LIVE, 0, SAVED, 0, 2 * m)
        self._copy(SHIFT, 0, SAVED, 2 * m, self.n_params)
        return self._shift_digest

    def restore(self, saved: Any) -> None:
        m = self.padded
        self._copy(SAVED, 0, LIVE, 0, 2 * m)
        self._copy(SAVED, 2 * m, SHIFT, 0, self.n_params)
        self._shift_digest = saved

    def close(self) -> None:
        """Give back the scratch arrays' space (the next open rebuilds LIVE from a slot)."""
        super().close()
        for name in (LIVE, SAVED):
            if name in self.store and not self.store.readonly:
                self.store.delete(name)
