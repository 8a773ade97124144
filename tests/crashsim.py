"""A crash-state explorer for the posterior (in the manner of ALICE and CrashMonkey).

`Recorder` is a Store that keeps its arrays in memory and records every create, write and
persist a collection run makes. `crash_states` then draws states a power loss could leave:
every write made durable by a later persist of its array, plus any subset of the writes since
that array's last persist, one of which may be torn (only some of its `tear`-byte units reached
the media: 512 B sectors on a disk, 8 B words on persistent memory; None for tiers whose writes
are atomic, like zarr's rename of a whole object). `materialise` writes one state onto a real tier.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from nvmlib.backends.base import Store
from nvmlib.backends.dram import DramStore


@dataclass(frozen=True)
class Op:
    """One recorded call: kind is "create", "write" or "persist"."""

    kind: str
    name: str
    start: int = 0
    data: np.ndarray | None = None  # a write's rows; a create's zero-filled array


class Recorder(DramStore):
    """A DRAM store that records every create, write_rows (and release) and persist."""

    kind = "recorder"
    in_place = False  # a model of a tier that persists: every row goes through write_rows

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []

    def create(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype | str, sparse: bool = False
    ) -> None:
        super().create(name, shape, dtype, sparse)
        self.ops.append(Op("create", name, data=np.zeros(shape, dtype)))

    def release(self, name: str, start: int, stop: int) -> None:
        """Recorded as a write of zeros (what released rows read as), durable when persisted."""
        super().release(name, start, stop)
        zeros = np.zeros((stop - start,) + self.shape(name)[1:], self.dtype(name))
        self.ops.append(Op("write", name, start, zeros))

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        super().write_rows(name, start, rows)
        self.ops.append(Op("write", name, start, np.array(rows, dtype=self.dtype(name))))

    def persist(self, name: str) -> None:
        self.ops.append(Op("persist", name))

    def delete(self, name: str) -> None:
        raise NotImplementedError(
            "the explorer records runs on a fresh store, which delete nothing"
        )


@dataclass
class CrashState:
    """The arrays a crash after `point` recorded ops leaves on the media."""

    point: int
    arrays: dict[str, np.ndarray]
    torn: str | None  # the array of the write that tore, if any


def _tear(old: np.ndarray, new: np.ndarray, unit: int, rng: random.Random) -> np.ndarray:
    """`new` where a random subset of its `unit`-byte pieces reached the media, `old` elsewhere."""
    out = np.array(old)
    o, n = out.view(np.uint8).reshape(-1), new.view(np.uint8).reshape(-1)
    for a in range(0, len(o), unit):
        if rng.random() < 0.5:
            o[a : a + unit] = n[a : a + unit]
    return out


def crash_points(ops: list[Op], count: int, rng: random.Random) -> Iterator[int]:
    """`count` crash points (0..len(ops)): rounds of every point once, each round in a random
    order, so `count` >= len(ops) + 1 visits every point."""
    points = list(range(len(ops) + 1))
    while count > 0:
        rng.shuffle(points)
        yield from points[:count]
        count -= len(points)


def crash_states(
    ops: list[Op], count: int, seed: int = 0, tear: int | None = 512
) -> Iterator[CrashState]:
    """`count` crash states of the recorded `ops` (seeded), at the points of `crash_points`."""
    rng = random.Random(seed)
    last_persist: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        if op.kind == "persist":
            last_persist.setdefault(op.name, []).append(i)
    for point in crash_points(ops, count, rng):
        arrays: dict[str, np.ndarray] = {}
        pending: list[int] = []
        for i, op in enumerate(ops[:point]):
            if op.kind == "create":
                arrays[op.name] = np.array(op.data)
            elif op.kind == "write":
                if any(i < p < point for p in last_persist.get(op.name, [])):
                    arrays[op.name][op.start : op.start + len(op.data)] = op.data
                else:
                    pending.append(i)
        kept = [i for i in pending if rng.random() < 0.5]
        torn_at = rng.choice(kept) if kept and tear and rng.random() < 0.5 else None
        for i in kept:
            op = ops[i]
            target = arrays[op.name][op.start : op.start + len(op.data)]
            target[...] = _tear(target, op.data, tear, rng) if i == torn_at else op.data
        yield CrashState(point, arrays, None if torn_at is None else ops[torn_at].name)


def materialise(state: CrashState, store: Store, previous: CrashState | None = None) -> None:
    """Make `store` (a real tier, holding arrays of the recorded shapes) hold exactly `state`:
    arrays the state lacks are deleted, the others written and persisted; with `previous` (the
    state the store holds now) only the rows that differ are written."""
    for name in store.names():
        if name not in state.arrays:
            store.delete(name)
    for name, data in state.arrays.items():
        if name not in store:
            store.create(name, data.shape, data.dtype)
            old = None
        else:
            old = None if previous is None else previous.arrays.get(name)
        if old is None or old.shape != data.shape or data.ndim == 1:
            changed = (
                np.arange(len(data))
                if old is None or not np.array_equal(old.view(np.uint8), data.view(np.uint8))
                else np.arange(0)
            )
        else:
            changed = np.flatnonzero(
                (
                    old.view(np.uint8).reshape(len(old), -1)
                    != data.view(np.uint8).reshape(len(data), -1)
                ).any(axis=1)
            )
        for run in (
            np.split(changed, np.flatnonzero(np.diff(changed) > 1) + 1) if len(changed) else []
        ):
            store.write_rows(name, int(run[0]), data[run[0] : run[-1] + 1])
        if len(changed):
            store.persist(name)
