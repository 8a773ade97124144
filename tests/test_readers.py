"""Readers while a writer collects (issue 10, defect 2): a writer process and reader processes run
together for NVMLIB_READER_SECONDS (default 20 s). Every snapshot a reader opens must be internally
consistent (mean, variance, rank and kept rows those of one count n, equal to a recomputation from
θ_0..θ_{n−1}), counts never go back, and no reader sees a false "damaged". A reader whose kept rows
the writer overwrote while it read (a ring keeps only K) moves to a newer snapshot by itself
(refresh), and only rarely (a writer faster than SNAPSHOT_TRIES reads) still gets SnapshotError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

N, K, EVERY = 1000, 16, 8
SECONDS = float(os.environ.get("NVMLIB_READER_SECONDS", "20"))
READERS = 2


def theta(t: int) -> np.ndarray:
    return (np.random.default_rng([11, t]).standard_normal(N) + t / 50).astype(np.float32)


def writer(path: Path, seconds: float, codec: str | None) -> None:
    from nvmlib import SWAGPosterior, open_store

    post = SWAGPosterior.create(
        open_store("mmap", path), N, max_rank=K, checkpoint_every=EVERY, codec=codec
    )
    post.update(theta(0))
    print("ready", flush=True)
    t, end = 1, time.monotonic() + seconds
    while time.monotonic() < end:
        post.update(theta(t))
        t += 1
        time.sleep(0.001)
    post.close()
    print(json.dumps({"updates": t}), flush=True)


def reader(path: Path, stop: Path) -> None:
    from nvmlib import SWAGPosterior, open_store
    from nvmlib.errors import SnapshotError

    seen, overtaken, last = 0, 0, 0
    s1, s2, n_sums = np.zeros(N), np.zeros(N), 0
    watching = SWAGPosterior.open(
        open_store("mmap", path, readonly=True), readonly=True
    )  # one reader, kept open
    while not stop.exists():
        store = open_store("mmap", path, readonly=True)
        try:
            post = SWAGPosterior.open(store, readonly=True) if seen % 2 else watching
            post.refresh()
            kept = (
                post.kept_rows()
            )  # overtaken by the writer, it moves to a newer snapshot by itself
            n, mean, var, rank = post.n_collected, post.mean(), post.variance(), post.rank
        except SnapshotError:
            overtaken += 1
            continue
        finally:
            store.close()
        assert n >= last, f"a snapshot went back from {last} to {n} updates"
        if n < n_sums:
            s1, s2, n_sums = np.zeros(N), np.zeros(N), 0
        for t in range(n_sums, n):
            row = theta(t).astype(np.float64)
            s1 += row
            s2 += row * row
        n_sums = last = n
        ref = s1 / n
        np.testing.assert_allclose(mean, ref, rtol=1e-9, atol=1e-9, err_msg=f"mean at {n}")
        np.testing.assert_allclose(
            var, np.maximum(s2 / n - ref * ref, 0), rtol=1e-5, atol=1e-7, err_msg=f"variance at {n}"
        )
        assert rank == min(n, K), (rank, n)
        np.testing.assert_array_equal(
            kept, np.stack([theta(t) for t in range(n - rank, n)]), err_msg=f"kept rows at {n}"
        )
        seen += 1
    print(json.dumps({"snapshots": seen, "overtaken": overtaken, "last": last}), flush=True)


@pytest.mark.parametrize("codec", ["", "delta-zstd"])
def test_readers_see_consistent_snapshots_while_a_writer_collects(tmp_path, codec):
    path, stop = tmp_path / "posterior", tmp_path / "stop"
    me = [sys.executable, __file__]
    seconds = SECONDS if not codec else SECONDS / 2
    w = subprocess.Popen(
        me + ["writer", str(path), str(seconds), codec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert w.stdout.readline() == "ready\n", w.stderr.read()
    readers = [
        subprocess.Popen(
            me + ["reader", str(path), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(READERS)
    ]
    w_out, w_err = w.communicate(timeout=seconds + 120)
    stop.touch()
    assert w.returncode == 0, w_err
    updates = json.loads(w_out.splitlines()[-1])["updates"]
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, (
            err
        )  # an inconsistent snapshot or a false "damaged" fails the reader
        report = json.loads(out.splitlines()[-1])
        print(f"writer: {updates} updates; reader: {report}")
        assert report["snapshots"] >= seconds and report["last"] <= updates
        assert report["overtaken"] <= report["snapshots"] // 20, (
            "readers should retry a newer snapshot by themselves"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    role, where = sys.argv[1], Path(sys.argv[2])
    writer(where, float(sys.argv[3]), sys.argv[4] or None) if role == "writer" else reader(
        where, Path(sys.argv[3])
    )
