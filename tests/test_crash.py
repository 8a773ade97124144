"""Crash safety of the posterior on every persistent tier: real SIGKILLs of a collecting process.

The child runs SWAGPosterior.create/open and an update loop with deterministic iterates
θ_t = theta(SEED, t) and prints each count once update() has returned, marking those that
checkpointed. update() leaves its row in flight until the next call, so after the kill the
posterior must reopen with n_collected >= the last checkpointed count and >= the last printed
count − 1, its log must hold the right rows, and its mean and variance must equal a
recomputation from θ_0..θ_{n-1}.
"""
from __future__ import annotations

import inspect
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT, META, MOMENTS

N_PARAMS, CAPACITY, EVERY, SEED, TRIALS = 5000, 64, 8, 1234, 12
TESTS = Path(__file__).resolve().parent


def theta(seed: int, t: int, n: int) -> np.ndarray:
    """The t-th iterate of a run: a deterministic function of (seed, t)."""
    return (np.random.default_rng([seed, t]).standard_normal(n) * (1 + t % 3) + t / 100).astype(np.float32)


CHILD = "import numpy as np\n" + inspect.getsource(theta) + f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from conftest import TIER_OPENERS
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import META
tier, tmp, fresh, codec = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "fresh", sys.argv[4] or None
from nvmlib.posterior import moments  # compile (or load) the update kernels before the clock starts
moments.stage(np.zeros(1, np.float32), np.zeros(1, np.float32))
moments.add_rows(np.zeros((1, 1), np.float32), np.zeros(1), np.zeros(1), np.zeros(1))
store = TIER_OPENERS[tier](tmp)
if fresh or META not in store:
    post = SWAGPosterior.create(store, {N_PARAMS}, max_rank={CAPACITY}, checkpoint_every={EVERY}, overwrite=True,
                                codec=codec)
else:
    post = SWAGPosterior.open(store)
print("ready", flush=True)
t = post.n_collected
while True:
    checkpointed = post.update(theta({SEED}, t, {N_PARAMS}))
    t += 1
    print(t, int(checkpointed), flush=True)
"""


class Expected:
    """Running float64 sums of θ_0..θ_{n-1}, extended as the posterior grows."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, np.zeros(N_PARAMS), np.zeros(N_PARAMS)

    def check(self, post: SWAGPosterior) -> None:
        n = post.n_collected
        assert n >= self.n, f"the posterior went back from {self.n} to {n} updates"
        for t in range(self.n, n):
            row = theta(SEED, t, N_PARAMS).astype(np.float64)
            self.s1 += row
            self.s2 += row * row
        self.n = n
        if n == 0:
            return
        mean = self.s1 / n
        np.testing.assert_allclose(post.mean(), mean, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(post.variance(), np.maximum(self.s2 / n - mean * mean, 0), rtol=1e-7, atol=1e-7)
        # every kept row is whole, the one a kill tore included: it was written to the spare slot
        kept = [theta(SEED, t, N_PARAMS) for t in range(max(0, n - CAPACITY), n)]
        np.testing.assert_array_equal(post.kept_rows(), np.stack(kept))


def _trial(tier: str, tmp: Path, fresh: bool, rng: random.Random, codec: str = "") -> tuple[int, int]:
    """Run the child, SIGKILL it 0.05-0.5 s after its first update; the last count it printed, and the
    last one that checkpointed."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, tier, str(tmp), "fresh" if fresh else "open", codec],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = child.stdout.readline()
    assert ready == "ready\n", child.stderr.read()
    first = child.stdout.readline()  # the first update checkpoints: on a busy disk its fsyncs take a while
    time.sleep(rng.uniform(0.05, 0.5))
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err
    lines = [fields for fields in map(str.split, (first + out).splitlines()) if len(fields) == 2]  # the kill may cut one
    assert lines, "the child made no update before the kill; raise the kill delay"
    return int(lines[-1][0]), max([int(t) for t, ck in lines if ck == "1"], default=0)


@pytest.mark.parametrize("codec", ["", "delta-zstd"], ids=["raw", "delta"])
def test_sigkill_while_collecting_loses_no_committed_update(persistent_tier, tmp_path, codec):
    tier, opener = persistent_tier
    rng, expected = random.Random(f"{tier}-{SEED}{codec}"), Expected()
    for trial in range(TRIALS if not codec else TRIALS // 4):
        fresh = trial % 5 == 0
        if fresh:
            expected = Expected()
        printed, committed = _trial(tier, tmp_path, fresh, rng, codec)
        with opener(readonly=True) as store:
            post = SWAGPosterior.open(store, readonly=True)
            assert post.n_collected >= committed, f"trial {trial}: checkpoint at {committed} was lost"
            assert post.n_collected >= printed - 1, f"trial {trial}: more than the row in flight was lost"
            expected.check(post)


@pytest.mark.parametrize("torn", [COMMIT, MOMENTS])
def test_torn_checkpoint_falls_back_to_the_previous_one(persistent_tier, torn):
    _, opener = persistent_tier
    expected = Expected()
    with opener() as store:
        with SWAGPosterior.create(store, N_PARAMS, max_rank=16, checkpoint_every=4) as post:
            for t in range(10):
                post.update(theta(SEED, t, N_PARAMS))
        records = store.read_rows(COMMIT, 0, 2)
        newest = int(np.argmax(records[:, 0]))
        block = store.read_rows(torn, newest, newest + 1)
        block.view(np.uint8)[..., 5] ^= 0xFF  # a torn write: some bytes of the newest slot are wrong
        store.write_rows(torn, newest, block)
        store.persist(torn)
        assert META in store
    with opener() as store:
        post = SWAGPosterior.open(store)
        assert post.n_collected == 10
        expected.check(post)
        post.close()
