"""Crash-state exploration (ALICE/CrashMonkey style): a collection run is recorded at the Store
level, then many states a power loss could leave are written onto each persistent tier and
reopened. Every state must open to a posterior equal to an exact recomputation from the rows it
holds, with every checkpointed update present, or (before the posterior was ever whole) be
refused with a clear error; a writer reopening it must go on collecting exactly.

NVMLIB_CRASH_STATES sets the states per tier (default 1000)."""
from __future__ import annotations

import os
import shutil
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest

from nvmlib.backends import available_tiers, open_store
from nvmlib.crashsim import Recorder, crash_states, materialise
from nvmlib.errors import PosteriorError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT, META
from nvmlib.posterior.log import LOG

N, K, EVERY, T = 64, 8, 4, 30
STATES = int(os.environ.get("NVMLIB_CRASH_STATES", "1000"))
REOPEN_EVERY = 10  # every 10th state is also reopened by a writer that collects 3 more updates


def theta(t: int) -> np.ndarray:
    return (np.random.default_rng([7, t]).standard_normal(N) * (1 + t % 3) + t / 10).astype(np.float32)


THETAS = np.stack([theta(t) for t in range(T + 3)]).astype(np.float64)


def _devdax(d: Path, **kw):
    dev = d / "dax0.0"
    if not dev.exists():
        with dev.open("wb") as f:
            f.truncate(8 << 20)
    return open_store("pmem", dev, device=True, **kw)


# tier -> (opener, unit of a torn write (None: writes are atomic))
TIERS = {
    "mmap": (lambda d, **kw: open_store("mmap", d / "mmap", **kw), 512),
    # the zarr tier writes log rows (4 KiB) and small records in place: torn 512-byte sectors, as for files
    "zarr": (lambda d, **kw: open_store("zarr", d / "posterior.zarr", **kw), 512),
}
if available_tiers().get("pmem") == "ok":
    TIERS["pmem"] = (lambda d, **kw: open_store("pmem", d / "pmem", **kw), 8)
    TIERS["pmem-devdax"] = (_devdax, 8)


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
    (a crash may keep a later row, whole or torn, that took the slot of a kept one: refused clearly)."""
    if n == 0:
        return True
    ref = THETAS[:n].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(post.mean(), ref.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(post.variance(), ref.var(0), rtol=1e-6, atol=1e-7)
    try:
        np.testing.assert_array_equal(post.kept_rows(), ref[max(0, n - K):n].astype(np.float32))
    except PosteriorError as exc:
        assert rows > n + 1 and ("overwritten by iterate" in str(exc) or "fails its checksum" in str(exc)), str(exc)
        return False
    return True


@pytest.fixture
def place(tmp_path):
    """A directory on tmpfs when there is one (the states are many; fsync there is free)."""
    shm = Path("/dev/shm")
    d = shm / f"nvmlib-crash-{uuid.uuid4().hex}" if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    d.mkdir(exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("codec", [None, "delta-zstd"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_every_crash_state_recovers_exactly_or_is_refused(tier, codec, place):
    opener, tear = TIERS[tier]
    ops = record(codec)
    writer = opener(place)
    outcomes = {"opened": 0, "refused": 0, "torn": 0, "reopened by a writer": 0, "kept rows refused": 0}
    previous = None  # the state the store holds (None after a writer changed it)
    states = STATES if codec is None else STATES // 2  # fewer for the compressed format: the suite's time
    for k, state in enumerate(crash_states(ops, states, seed=zlib.crc32(f"{tier}{codec}".encode()), tear=tear)):
        must_have, whole, rows = committed(ops, state.point)
        materialise(state, writer, previous)
        previous = state
        try:
            with opener(place, readonly=True) as store:
                post = SWAGPosterior.open(store, readonly=True)
        except PosteriorError as exc:
            assert not whole, f"state {k} (crash after op {state.point}) refused although whole: {exc}"
            assert any(m in str(exc) for m in ("no posterior", "incomplete", "interrupted create")), str(exc)
            outcomes["refused"] += 1
            continue
        n = post.n_collected
        assert must_have <= n <= rows, f"state {k}: {n} updates, checkpointed {must_have}, rows written {rows}"
        outcomes["kept rows refused"] += not assert_exact(post, n, rows)
        outcomes["opened"] += 1
        outcomes["torn"] += state.torn is not None
        if k % REOPEN_EVERY == 0:
            previous, again = None, SWAGPosterior.open(writer)
            assert again.n_collected == n
            for t in range(n, n + 3):
                again.update(THETAS[t])
            again.close()
            with opener(place, readonly=True) as store:
                assert assert_exact(SWAGPosterior.open(store, readonly=True), n + 3, n + 3)
            outcomes["reopened by a writer"] += 1
    writer.close()
    print(tier, outcomes)
    assert outcomes["opened"] > states // 2 and (tear is None or outcomes["torn"] > 0)
