"""Each figure function draws from the tables the experiments return and saves a real PNG and
PDF."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import matplotlib
import matplotlib.colors
import numpy as np
import pandas as pd
import pytest

from nvmlib.paper import plots
from nvmlib.paper.evaluate import ece, reliability_table
from nvmlib.paper.experiments import epoch_table

matplotlib.use("Agg")
PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF"


def assert_image(path: Path) -> None:
    """A non-empty PNG (with its magic bytes and a size) or PDF."""
    data = path.read_bytes()
    assert len(data) > 1000, path
    if path.suffix == ".png":
        from PIL import Image

        assert data.startswith(PNG_MAGIC)
        with Image.open(path) as img:
            assert img.width > 100 and img.height > 100
    else:
        assert data.startswith(PDF_MAGIC)


def _methods(**columns) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"method": m, **{k: v(i) for k, v in columns.items()}}
            for m in ("SGD", "SWA", "SWAG")
            for i in range(4)
        ]
    )


FIGURES = {
    "epochs": lambda: plots.epoch_times(
        pd.DataFrame({"epoch": [1, 2], "seconds": [3.0, 2.5]}), "mmap"
    ),
    "tier_runtime": lambda: plots.tier_runtime(
        pd.DataFrame(
            [
                {
                    "tier": t,
                    "epochs": e,
                    "epoch_ratio": r,
                    "total_ratio": r * 1.1,
                    "epoch_s": 5 * r,
                    "write_MBps": 300 / r,
                }
                for t, r in (("dram", 1.0), ("mmap", 1.2))
                for e in (1, 2, 3)
            ]
        ),
        {"device under mmap": 420.0},
    ),
    "rank": lambda: plots.quality_vs_rank(
        _methods(
            K=lambda i: 10**i,
            accuracy=lambda i: 0.9 + i / 100,
            nll=lambda i: 0.3 - i / 50,
            ece=lambda i: 0.05,
        )
    ),
    "rotated": lambda: plots.rotated(
        _methods(angle=lambda i: 30 * i, accuracy=lambda i: 0.9 - i / 5, nll=lambda i: 0.3 + i)
    ),
    "reliability": lambda: plots.reliability(
        _methods(
            confidence=lambda i: 0.4 + i / 7, accuracy=lambda i: 0.35 + i / 7, count=lambda i: 10
        )
    ),
    "ood": lambda: plots.ood(
        pd.DataFrame(
            {
                "method": np.repeat(["SGD", "SWAG"], 200),
                "data": np.tile(np.repeat(["in", "out"], 100), 2),
                "entropy": np.random.default_rng(0).gamma(2.0, 0.2, 400),
            }
        ),
        pd.DataFrame({"method": ["SGD", "SWAG"], "auroc": [0.8, 0.9]}),
    ),
    "sampling": lambda: plots.sampling(
        pd.DataFrame(
            [
                {"S": s, "mode": m, "seconds": s**p, "read_MBps": 400 / s ** (p - 1)}
                for s in (1, 2, 4, 8, 16, 32, 64)
                for m, p in (("one streamed pass", 0.1), ("S passes", 1.0))
            ]
        ),
        {"device": 450.0},
        "mmap",
    ),
    "method_metrics": lambda: plots.method_metrics(
        pd.DataFrame(
            {
                "accuracy": [0.90, 0.91, 0.92, 0.93],
                "nll": [0.3, 0.28, 0.26, 0.25],
                "ece": [0.05, 0.03, 0.02, 0.01],
            },
            index=pd.Index(["SGD", "SWA", "SWAG", "MultiSWAG"], name="method"),
        ),
        "fashion test",
    ),
    "collection_cost": lambda: plots.collection_cost(
        pd.DataFrame({"run": [0, 1], "train_step_s": [0.30, 0.31], "collect_s": [0.010, 0.002]})
    ),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_saves_png_and_pdf_with_its_footer(name: str, tmp_path: Path) -> None:
    fig = FIGURES[name]()
    footer = plots.caption(
        "smoke", {"device under mmap": {"write_MBps": 420.4, "read_MBps": 910.0}}
    )
    paths = plots.save(fig, f"t-{name}", tmp_path / "figures", footer)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    for path in paths:
        assert_image(path)
    assert [
        " ".join(t.get_text().split()) for t in fig.texts if t.get_text().startswith("smoke")
    ] == [footer]


def test_caption_names_preset_machine_bandwidth_and_date() -> None:
    text = plots.caption(
        "default", {"device under mmap": {"write_MBps": 420.4, "read_MBps": 910.0}}
    )
    assert (
        text.startswith("default preset · ")
        and f"{os.cpu_count()} cores" in text
        and "GiB RAM" in text
    )
    assert (
        "device under mmap: 420 MB/s write, 910 MB/s read" in text
        and time.strftime("%Y-%m-%d") in text
    )
    assert "not measured" in plots.caption("default", {})


def tick_labels(axis) -> list[str]:
    fig = axis.get_figure()
    fig.canvas.draw()
    return [
        t.get_text()
        for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True)
        if t.get_text()
    ]


def test_counts_get_plain_integer_ticks_and_log_axes_no_powers() -> None:
    fig = FIGURES["sampling"]()
    seconds, rate = fig.axes[0], fig.axes[1]
    assert (
        tick_labels(seconds.xaxis)
        == tick_labels(rate.xaxis)
        == ["1", "2", "4", "8", "16", "32", "64"]
    )
    assert tick_labels(seconds.yaxis) and all(
        re.fullmatch(r"[0-9.]+", t) for t in tick_labels(seconds.yaxis)
    )
    rank = FIGURES["rank"]().axes[0]
    assert tick_labels(rank.xaxis) == ["1", "10", "100", "1000"]
    assert tick_labels(FIGURES["tier_runtime"]().axes[0].xaxis) == ["1", "2", "3"]


def line_colours(fig) -> set[tuple]:
    return {
        matplotlib.colors.to_rgb(line.get_color())
        for ax in fig.axes
        for line in ax.get_lines()
        if len(line.get_xdata()) > 2
    }


def test_a_tier_has_one_colour_in_every_figure() -> None:
    mmap = matplotlib.colors.to_rgb(plots.TIER_COLOURS["mmap"])
    assert line_colours(FIGURES["sampling"]()) == {mmap}
    runtime = FIGURES["tier_runtime"]()
    assert line_colours(runtime) == {mmap, matplotlib.colors.to_rgb(plots.TIER_COLOURS["dram"])}
    bars = FIGURES["epochs"]().axes[0].patches
    assert {matplotlib.colors.to_rgb(b.get_facecolor()) for b in bars} == {mmap}
    assert (
        plots.tier_colour("memmap")
        == plots.tier_colour("my-nvme", "mmap")
        == plots.TIER_COLOURS["mmap"]
    )


def test_epoch_table_reads_the_timings_in_order() -> None:
    timings = {
        "epoch 2 time (s)": 2.0,
        "make model time (s)": 0.1,
        "epoch 1 time (s)": 1.0,
        "epoch 10 time (s)": 3.0,
    }
    table = epoch_table(timings)
    assert table.epoch.tolist() == [1, 2, 10] and table.seconds.tolist() == [1.0, 2.0, 3.0]


def test_reliability_bins_give_evaluate_ece() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=500)
    labels = rng.integers(0, 10, 500)
    bins = reliability_table(probs, labels)
    assert bins["count"].sum() == 500
    gap = (bins["count"] / 500 * (bins.accuracy - bins.confidence).abs()).sum()
    assert gap == pytest.approx(ece(probs, labels))
