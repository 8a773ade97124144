"""Crash safety of the posterior on every persistent tier: real SIGKILLs of a collecting process.

The child (forked by a server that imported nvmlib once) runs SWAGPosterior.create/open and an
update loop with deterministic iterates θ_t = theta(SEED, t) and prints each count once update()
has returned, marking those that checkpointed. update() leaves its row in flight until the next
call (an update that checkpoints too: its checkpoint is written behind it, and durable once the next
one starts), so after the kill the posterior must reopen with n_collected >= the last printed count
− 1, a valid checkpoint at or after the checkpointed count before the last one, its log must hold
the right rows, and its mean and variance must equal a recomputation from θ_0..θ_{n-1}.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from contract import TierCase, per_tier

from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import COMMIT, META, MOMENTS

N_PARAMS, CAPACITY, EVERY, SEED, TRIALS = 5000, 64, 8, 1234, 12
TESTS = Path(__file__).resolve().parent


def theta(seed: int, t: int, n: int) -> np.ndarray:
    """The t-th iterate of a run: a deterministic function of (seed, t)."""
    return (np.random.default_rng([seed, t]).standard_normal(n) * (1 + t % 3) + t / 100).astype(
        np.float32
    )


# A server started once per test class: it imports nvmlib and compiles the update kernels, then
# forks one collecting child per trial (no thread runs in it before a fork): a trial costs the
# kill delay, not an import of torch. The child prints to the FIFO it is given; the server says
# the child's pid, then (told to reap it) how it ended (os.waitstatus_to_exitcode: -9 for a
# SIGKILL).
SERVER = (
    "import numpy as np\n"
    + inspect.getsource(theta)
    + f"""
import os, sys, traceback
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from contract import TIERS
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.layout import META
from nvmlib.posterior import moments
moments.stage(np.zeros(1, np.float32), np.zeros(1, np.float32))
moments.add_rows(np.zeros((1, 1), np.float32), np.zeros(1), np.zeros(1), np.zeros(1))


def collect(tier, tmp, fresh, codec, fifo):
    sys.stdout = open(fifo, "w")
    store = TIERS[tier].open(tmp)
    codec, _, kind = codec.partition("+")  # "raw+store": the moments on the tier
    codec, kind = None if codec == "raw" else codec, kind or "auto"
    if fresh or META not in store:
        post = SWAGPosterior.create(store, {N_PARAMS}, max_rank={CAPACITY},
                                    checkpoint_every={EVERY}, overwrite=True, codec=codec,
                                    moments=kind)
    else:
        post = SWAGPosterior.open(store, moments=kind)
    print("ready", flush=True)
    t = post.n_collected
    while True:
        checkpointed = post.update(theta({SEED}, t, {N_PARAMS}))
        t += 1
        print(t, int(checkpointed), flush=True)


for line in sys.stdin:
    tier, tmp, fresh, codec, fifo = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            collect(tier, Path(tmp), fresh == "fresh", codec, fifo)
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    print(pid, flush=True)
    sys.stdin.readline()  # reap it when told (the pid stays the child's until then)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
)


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
        np.testing.assert_allclose(
            post.variance(), np.maximum(self.s2 / n - mean * mean, 0), rtol=1e-7, atol=1e-7
        )
        # every kept row is whole, the one a kill tore included: it was written to the spare slot
        kept = [theta(SEED, t, N_PARAMS) for t in range(max(0, n - CAPACITY), n)]
        np.testing.assert_array_equal(post.kept_rows(), np.stack(kept))


def _state(post: SWAGPosterior) -> str:
    """What a reopened posterior's files hold: the count, the checkpoints, and why the first row
    after its count does not verify (for a failure's message)."""
    journal = post._journal
    count = journal.read_count()
    stop = max(count or 0, post.n_collected + 1)
    why = [b[3] for b in journal.log.stream([(post.n_collected, stop)]) if b[3]]
    return f"count on the tier {count}, checkpoints {journal.checkpoints(None, [])}, rows: {why}"


class CrashContract(TierCase):
    """SIGKILLed collection and torn checkpoints lose no committed update."""

    @pytest.fixture(scope="class")
    @classmethod
    def server(cls) -> subprocess.Popen:
        """The forking server of SERVER, for this class's trials."""
        if not cls.tier.persistent:
            pytest.skip(f"{cls.tier.name} lacks 'persistent'")
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        yield server
        server.stdin.close()
        assert server.wait(timeout=60) == 0

    def trial(
        self, server: subprocess.Popen, tmp: Path, fresh: bool, rng: random.Random, codec: str
    ) -> tuple[int, int]:
        """Fork a collecting child, SIGKILL it 0.05-0.5 s after its first update; the last count
        it printed, and the count of the checkpoint before the last one it took (durable: a
        checkpoint starts once the one before it is written)."""
        fifo = tmp / "child.out"
        os.mkfifo(fifo)
        how = "fresh" if fresh else "open"
        server.stdin.write(f"{self.tier.name} {tmp} {how} {codec} {fifo}\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        try:
            with open(fifo) as out:
                ready = out.readline()
                assert ready == "ready\n", f"the child wrote {ready!r} (its error is on stderr)"
                first = out.readline()  # the first update checkpoints (fsyncs: slow on a busy disk)
                time.sleep(rng.uniform(0.05, 0.5))
                os.kill(pid, signal.SIGKILL)
                rest = out.read()
        finally:
            os.kill(pid, signal.SIGKILL)  # not yet reaped: the pid is still the child's
            server.stdin.write("reap\n")
            server.stdin.flush()
            ended = int(server.stdout.readline())
            fifo.unlink()
        assert ended == -signal.SIGKILL, f"the child ended with {ended}, not by the kill"
        lines = [
            fields for fields in map(str.split, (first + rest).splitlines()) if len(fields) == 2
        ]  # the kill may cut one
        assert lines, "the child made no update before the kill; raise the kill delay"
        taken = [0, 0] + [int(t) for t, ck in lines if ck == "1"]
        return int(lines[-1][0]), taken[-2]

    @pytest.mark.parametrize(
        "codec", ["raw", "delta-zstd", "raw+store"], ids=["raw", "delta", "store-moments"]
    )
    def test_sigkill_while_collecting_loses_no_committed_update(
        self, server, tmp_path, reopen, codec
    ):
        rng, expected = random.Random(f"{self.tier.name}-{SEED}{codec}"), Expected()
        for trial in range(TRIALS if codec == "raw" else TRIALS // 4):
            fresh = trial % 5 == 0
            if fresh:
                expected = Expected()
            printed, durable = self.trial(server, tmp_path, fresh, rng, codec)
            with reopen(readonly=True) as store:
                post = SWAGPosterior.open(store, readonly=True)
                n = post.n_collected
                assert n >= printed - 1, (
                    f"trial {trial}: more than the row in flight was lost: {_state(post)}"
                )
                newest = max((c[1] for c in post._journal.checkpoints(None, [])), default=0)
                assert newest >= durable, f"trial {trial}: checkpoint at {durable} was lost"
                expected.check(post)

    @pytest.mark.parametrize("torn", [COMMIT, MOMENTS])
    def test_torn_checkpoint_falls_back_to_the_previous_one(self, reopen, torn):
        self.require("persistent")
        expected = Expected()
        with reopen() as store:
            with SWAGPosterior.create(store, N_PARAMS, max_rank=16, checkpoint_every=4) as post:
                for t in range(10):
                    post.update(theta(SEED, t, N_PARAMS))
            records = store.read_rows(COMMIT, 0, 2)
            newest = int(np.argmax(records[:, 0]))
            block = store.read_rows(torn, newest, newest + 1)
            block.view(np.uint8)[..., 5] ^= (
                0xFF  # a torn write: some bytes of the newest slot are wrong
            )
            store.write_rows(torn, newest, block)
            store.persist(torn)
            assert META in store
        with reopen() as store:
            post = SWAGPosterior.open(store)
            assert post.n_collected == 10
            expected.check(post)
            post.close()


globals().update(per_tier(CrashContract))
