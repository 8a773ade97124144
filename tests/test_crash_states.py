"""Crash-state exploration (ALICE/CrashMonkey style): a collection run is recorded at the Store
level, then many states a power loss could leave are written onto each persistent tier and
reopened. Every state must open to a posterior equal to an exact recomputation from the rows it
holds, with every checkpointed update present, or (before the posterior was ever whole) be
refused with a clear error; a writer reopening it must go on collecting exactly.

The states visit every crash point of the recorded run twice (262 states for the raw log, 344
for the compressed one), in a random order; NVMLIB_CRASH_STATES=1000 sets more states per tier
and log format (the full count: docs/verified.md)."""

from __future__ import annotations

import os
import shutil
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from contract import TierCase, per_tier
from crashsim import Recorder, crash_states, materialise

from nvmlib.errors import PosteriorError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT, META
from nvmlib.posterior.log import LOG

N, K, EVERY, T = 64, 8, 4, 30
STATES = int(os.environ.get("NVMLIB_CRASH_STATES", "0"))  # 0: every crash point twice
REOPEN_EVERY = 10  # every 10th state is also reopened by a writer that collects 3 more updates


def theta(t: int) -> np.ndarray:
    return (np.random.default_rng([7, t]).standard_normal(N) * (1 + t % 3) + t / 10).astype(
        np.float32
    )


THETAS = np.stack([theta(t) for t in range(T + 3)]).astype(np.float64)


def record(codec: str | None) -> list:
    rec = Recorder()
    post = SWAGPosterior.create(rec, N, max_rank=K, checkpoint_every=EVERY, codec=codec)
    for t in range(T):
        post.update(THETAS[t])
    post.close()
    return rec.ops


def committed(ops: list, point: int) -> tuple[int, bool, int]:
    """(updates in the newest commit record persisted before `point`, whether META was persisted,
    rows written before `point`)."""
    count, last, meta, rows = 0, None, False, 0
    for op in ops[:point]:
        if op.kind == "write" and op.name == COMMIT:
            last = int(op.data[0, 1])
        elif op.kind == "persist" and op.name == COMMIT and last is not None:
            count = last
        elif op.kind == "persist" and op.name == META:
            meta = True
        elif op.kind == "write" and op.name == LOG:  # a row, or a record (one block when N = 64)
            rows += 1
    return count, meta, rows


def assert_exact(post: SWAGPosterior, n: int, rows: int) -> bool:
    """The posterior equals a recomputation from θ_0..θ_{n−1}; whether its kept rows could be read
    (a crash may keep a later row, whole or torn, that took the slot of a kept one: refused
    clearly)."""
    if n == 0:
        return True
    ref = THETAS[:n].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(post.mean(), ref.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(post.variance(), ref.var(0), rtol=1e-6, atol=1e-7)
    try:
        np.testing.assert_array_equal(post.kept_rows(), ref[max(0, n - K) : n].astype(np.float32))
    except PosteriorError as exc:
        assert rows > n + 1 and (
            "overwritten by iterate" in str(exc)
            or "fails its checksum" in str(exc)
            or "was not written" in str(exc)  # a writer reopening it discarded the later row
        ), str(exc)
        return False
    return True


class CrashStatesContract(TierCase):
    """Every crash state recovers exactly or is refused."""

    @pytest.fixture
    def where(self, tmp_path: Path) -> Path:
        """A directory on tmpfs when there is one (the states are many; fsync there is free)."""
        shm = Path("/dev/shm")
        usable = shm.is_dir() and os.access(shm, os.W_OK)
        d = shm / f"nvmlib-crash-{uuid.uuid4().hex}" if usable else tmp_path
        d.mkdir(exist_ok=True)
        yield d
        shutil.rmtree(d, ignore_errors=True)

    @pytest.mark.parametrize("codec", [None, "delta-zstd"])
    def test_every_crash_state_recovers_exactly_or_is_refused(self, codec, reopen):
        self.require("tear", "no model of its torn writes")
        ops = record(codec)
        writer = reopen()
        outcomes = dict.fromkeys(
            ["opened", "refused", "torn", "reopened by a writer", "kept rows refused"], 0
        )
        previous = None  # the state the store holds (None after a writer changed it)
        states = STATES or 2 * (len(ops) + 1)
        seed = zlib.crc32(f"{self.tier.name}{codec}".encode())
        for k, state in enumerate(crash_states(ops, states, seed=seed, tear=self.tier.tear)):
            must_have, whole, rows = committed(ops, state.point)
            materialise(state, writer, previous)
            previous = state
            try:
                with reopen(readonly=True) as store:
                    post = SWAGPosterior.open(store, readonly=True)
            except PosteriorError as exc:
                assert not whole, (
                    f"state {k} (crash after op {state.point}) refused although whole: {exc}"
                )
                reasons = ("no posterior", "incomplete", "interrupted create")
                assert any(m in str(exc) for m in reasons), str(exc)
                outcomes["refused"] += 1
                continue
            n = post.n_collected
            assert must_have <= n <= rows, (
                f"state {k}: {n} updates, checkpointed {must_have}, rows written {rows}"
            )
            kept = assert_exact(post, n, rows)
            outcomes["kept rows refused"] += not kept
            outcomes["opened"] += 1
            outcomes["torn"] += state.torn is not None
            if k % REOPEN_EVERY == 0:
                previous, again = None, SWAGPosterior.open(writer)
                assert again.n_collected == n
                for t in range(n, n + 3):
                    again.update(THETAS[t])
                again.close()
                with reopen(readonly=True) as store:
                    # a kept row the crash lost to a later one stays lost until the ring passes it
                    again = SWAGPosterior.open(store, readonly=True)
                    assert assert_exact(again, n + 3, rows + 3 if not kept else n + 3) or not kept
                outcomes["reopened by a writer"] += 1
        writer.close()
        print(self.tier.name, outcomes)
        assert outcomes["opened"] > states // 2 and outcomes["torn"] > 0


globals().update(per_tier(CrashStatesContract))
