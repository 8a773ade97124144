"""benchmarks/bench_big_model.py: --quick runs end to end in a subprocess with sane figures, and a
run whose log does not fit on the disk is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    """Run the benchmark with `args` (this checkout's nvmlib first on the path)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_big_model.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=600,
    )


def test_quick_big_model_benchmark_reports_sane_figures(tmp_path):
    out = tmp_path / "big_model.json"
    done = bench(str(tmp_path / "posteriors"), "--quick", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    cfg = r["config"]
    assert r["quick"] and 5e6 < r["n_params"] < 20e6 and r["iterate_bytes"] == 4 * r["n_params"]
    assert r["K"] == cfg["min_rank"] and len(r["step_s"]["collect"]) == r["K"]
    assert len(r["step_s"]["plain"]) == cfg["plain_steps"]
    assert len(r["step_s"]["codec_collect"]) == r["codec"]["steps"] == cfg["codec_steps"]
    assert all(s > 0 for s in r["step_s"]["plain"] + r["step_s"]["collect"])
    assert r["K"] * r["iterate_bytes"] <= r["log_disk_bytes"] <= r["posterior_disk_bytes"]
    assert r["log_exceeds_ram"] == (r["log_disk_bytes"] > r["ram_bytes"])
    assert 0 < r["codec"]["log_stored_bytes"] and 0 < r["codec"]["log_disk_bytes"]
    ppl = r["perplexity"]
    assert len(ppl["samples"]) == r["samples"] == 2
    for value in (ppl["last_iterate"], ppl["swa_mean"], ppl["swag_bma"], *ppl["samples"]):
        assert 1 < value < 2 * ppl["uniform"]  # a few steps learn something, not everything
    rss = r["rss"]
    assert 0 < rss["after_model_optimizer"] <= rss["after_collection"] <= rss["after_sampling"]
    assert rss["after_sampling"] <= rss["peak"] < r["ram_bytes"]
    assert all(v > 0 for v in r["dd"].values()) and r["dd_read_log_s"] > 0
    assert not list((tmp_path / "posteriors").iterdir())  # the posteriors are removed
    assert "held-out perplexity" in done.stdout


def test_a_log_larger_than_the_disk_is_refused_before_anything_is_written(tmp_path):
    done = bench(
        str(tmp_path / "posteriors"),
        "--ram-multiple",
        "10000",
        "--json",
        str(tmp_path / "out.json"),
    )
    assert done.returncode != 0 and "GB free but a raw log of" in done.stderr
    assert "choose a directory on a larger disk" in done.stderr
    assert sorted(tmp_path.iterdir()) == []  # no posterior directory, no JSON
