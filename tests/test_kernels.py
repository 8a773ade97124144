"""The update kernels (nvmlib.posterior.moments) on 1 and 2 threads, and the posterior's batches of
staged rows: a batch gives the bits of its rows added one at a time, reads between batches see
every counted row, and a reopen rebuilds the same moments."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from nvmlib.backends import open_store
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.log import staged_rows

KERNELS = """
import numpy as np
from nvmlib.posterior import moments as M
assert M.THREADS == int(__import__("os").environ["NUMBA_NUM_THREADS"])
n = 2 * M.BLOCK + M.TILE + 123  # blocks and tiles that do not divide the parameters
rng = np.random.default_rng(0)
rows = (3 + rng.standard_normal((5, n))).astype(np.float32)
for first, count in ((0, 5), (3, 4), (4, 1), (2, 0)):  # whole ring, wrapping, one, none
    batch, single = np.zeros((2, n)), np.zeros((2, n))
    shift = rows[1].astype(np.float64)
    M.add_rows(rows, shift, batch[0], batch[1], first, count)
    for r in range(count):
        M.add_rows(rows[(first + r) % 5][None], shift, single[0], single[1])
    assert batch.tobytes() == single.tobytes(), (first, count)
    ref = rows[[(first + r) % 5 for r in range(count)]].astype(np.float64) - shift
    np.testing.assert_allclose(batch, [ref.sum(0), (ref ** 2).sum(0)], rtol=1e-12, atol=1e-12)
dst = np.empty(n, np.float32)
assert M.stage(rows[0].astype(np.float64), dst) and dst.tobytes() == rows[0].tobytes()
for at in (0, M.BLOCK - 1, M.BLOCK, n - 1):  # a bad value in the first, a middle and the last block
    for bad in (np.nan, np.inf, 1e39):  # 1e39 overflows float32
        src = rows[0].astype(np.float64)
        src[at] = bad
        assert not M.stage(src, dst), (at, bad)
print("ok")
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_exact_on_any_number_of_threads(threads):
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# numba.set_num_threads takes a lock shared by every process forked after it was made: a forked
# process killed holding it (a SIGKILLed DataLoader worker, a crash test's child) must not hang the
# kernels of a thread that has run one before
DEAD_HOLDER = """
import os, signal, threading
import numpy as np
from numba.np.ufunc import parallel
from nvmlib.posterior import moments as M
rows, dst = np.ones((2, 1000), np.float32), np.empty(1000, np.float32)
s1, s2, shift = np.zeros(1000), np.zeros(1000), np.zeros(1000)
worker = threading.Thread(target=M.add_rows, args=(rows, shift, s1, s2))
worker.start(); worker.join()
M.stage(rows[0], dst)
pid = os.fork()
if pid == 0:
    parallel._backend_init_process_lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)
os.waitpid(pid, 0)
for _ in range(100):
    assert M.stage(rows[0], dst)
    M.add_rows(rows, shift, s1, s2)
assert s1[0] == 202, s1[0]
print("ok")
"""


def test_kernels_go_on_after_a_forked_process_died_holding_numbas_lock():
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", DEAD_HOLDER], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("codec", [None, "delta-zstd"])
def test_batched_moments_are_exact_between_batches_and_after_reopen(tmp_path, codec):
    n = 3000
    th = 3.0 + np.cumsum(np.random.default_rng(1).normal(scale=1e-2, size=(50, n)), axis=0)
    th = th.astype(np.float32)
    B = staged_rows(n, "float32")
    store = open_store("mmap", tmp_path / "post")
    post = SWAGPosterior.create(store, n, max_rank=40, checkpoint_every=11, codec=codec)
    ref = th.astype(np.float64)
    for t in range(len(th)):
        post.update(th[t])
        if t in (0, 2, B, 2 * B + 3):  # reads in the middle of a batch see every counted row
            np.testing.assert_allclose(post.mean(), ref[: t + 1].mean(0), rtol=1e-12)
            np.testing.assert_allclose(post.variance(), ref[: t + 1].var(0), rtol=1e-9, atol=1e-15)
    mean, var = post.mean(), post.variance()
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, ref.var(0), rtol=1e-9, atol=1e-15)
    post.truncate(44)  # a checkpoint at 44 and the replay of rows 45..49 on the way back
    np.testing.assert_allclose(post.mean(), ref[:44].mean(0), rtol=1e-12)
    for t in range(44, 50):
        post.update(th[t])
    assert post.mean().tobytes() == mean.tobytes()  # the same rows in the same order: the same bits
    reader = SWAGPosterior.open(open_store("mmap", tmp_path / "post"), readonly=True)
    assert (
        reader.n_collected == 50
    )  # from a checkpoint before 50 and the replay of the rows after it
    assert reader.mean().tobytes() == mean.tobytes()
    assert reader.variance().tobytes() == var.tobytes()
    reader.close()
    post.close()
