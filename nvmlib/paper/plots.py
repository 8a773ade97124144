"""Figure functions for the notebooks: each takes the tidy tables the experiments return.

Every function returns a matplotlib Figure; `save` writes it as PNG and PDF under figures/ with a
footer saying how it was made (`caption`: preset, machine, measured device bandwidth, date).
A tier has one colour in every figure (TIER_COLOURS), and so has each method (METHOD_COLOURS);
counts (epochs, samples, iterates) get integer ticks with plain labels.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)

from nvmlib.paper.evaluate import METHODS

FORMATS = ("png", "pdf")
METHOD_ORDER = list(METHODS)
_COLOURS = sns.color_palette("colorblind")
# tier (or the paper's label for one) -> colour, the same in every figure
TIER_COLOURS = {
    "dram": _COLOURS[0],
    "mmap": _COLOURS[1],
    "memmap": _COLOURS[1],
    "pmem": _COLOURS[2],
    "fs-dax": _COLOURS[2],
    "dev-dax": _COLOURS[9],
    "pymm": _COLOURS[3],
    "zarr": _COLOURS[4],
}
METHOD_COLOURS = {
    "SGD": _COLOURS[7],
    "SWA": _COLOURS[5],
    "SWAG": _COLOURS[6],
    "MultiSWAG": _COLOURS[8],
}
PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


def tier_colour(label: str, backend: str | None = None) -> Any:
    """The colour of a tier: by its label, else by its backend, else black."""
    return TIER_COLOURS.get(label, TIER_COLOURS.get(backend or "", "black"))


def _style() -> None:
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)


def caption(preset: str, bandwidth: dict[str, dict[str, Any]]) -> str:
    """How a figure was made: preset, this machine (cores, RAM, load now), the device bandwidth
    measured in the run ({where: {"write_MBps", "read_MBps"}}) and the date."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    devices = (
        "; ".join(
            f"{where}: {b['write_MBps']:.0f} MB/s write, {b['read_MBps']:.0f} MB/s read"
            for where, b in bandwidth.items()
        )
        or "device bandwidth not measured"
    )
    return (
        f"{preset} preset · {os.cpu_count()} cores, {ram:.0f} GiB RAM, load "
        f"{os.getloadavg()[0]:.1f} · {devices} · {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def save(
    fig: plt.Figure, name: str, figures_dir: str | Path, footer: str | None = None
) -> list[Path]:
    """Write `fig` as figures_dir/name.png and .pdf with `footer` (a `caption`) under it; returns
    the paths."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    if footer:  # under everything drawn so far (axis labels may reach below the figure's edge)
        width = max(
            40, int(fig.get_figwidth() * 72 / (7 * 0.55))
        )  # characters of 7-point text per line
        bottom = fig.get_tightbbox(fig.canvas.get_renderer()).y0 / fig.get_figheight()
        fig.text(
            0.01,
            min(bottom, 0) - 0.02,
            textwrap.fill(footer, width),
            ha="left",
            va="top",
            fontsize=7,
            color="dimgray",
        )
    paths = [out / f"{name}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def epoch_times(epochs: pd.DataFrame, tier: str) -> plt.Figure:
    """Seconds per epoch of one collection run on `tier`; `epochs` has columns epoch, seconds."""
    _style()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.barplot(data=epochs, x="epoch", y="seconds", color=tier_colour(tier), saturation=1, ax=ax)
    ax.set(xlabel="epoch", ylabel="epoch time (s)", title=f"SGD with SWAG collection on {tier}")
    return fig


def count_axis(axis: Any, values: Iterable[float]) -> None:
    """Ticks at the counts that were measured (epochs, samples, iterates), labelled 1, 2, 64, 181;
    call it after setting the axis' scale."""
    axis.set_major_locator(FixedLocator(sorted({float(v) for v in values})))
    axis.set_major_formatter(PLAIN)
    axis.set_minor_locator(NullLocator())


def plain_log(axis: Any) -> None:
    """A log axis labelled 0.1, 0.2, 0.5, 1, 2, 5 (no 2×10⁰ labels)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(PLAIN)
    axis.set_minor_formatter(NullFormatter())


def _bandwidth_lines(ax: plt.Axes, device_mbps: dict[str, float]) -> None:
    """A dashed line per measured device: {where: MB/s}."""
    for i, (where, mbps) in enumerate(device_mbps.items()):
        ax.axhline(
            mbps,
            color="black",
            ls=("--", ":", "-.")[i % 3],
            lw=1,
            label=f"{where}: {mbps:.0f} MB/s",
        )


def tier_runtime(table: pd.DataFrame, device_mbps: dict[str, float]) -> plt.Figure:
    """The paper's figure: epoch time and total time of each tier relative to DRAM vs epochs.

    table: one row per (tier, epochs) with epoch_ratio, total_ratio, epoch_s, write_MBps.
    device_mbps: {device: measured sequential write MB/s} of the devices under the file tiers.
    """
    _style()
    backends = dict(zip(table.tier, table.backend, strict=True)) if "backend" in table else {}
    palette = {tier: tier_colour(tier, backends.get(tier)) for tier in table.tier.unique()}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = (
        ("epoch_ratio", "avg epoch time / DRAM"),
        ("total_ratio", "total time / DRAM"),
        ("epoch_s", "avg epoch time (s)"),
        ("write_MBps", "posterior write rate (MB/s)"),
    )
    for ax, (column, label) in zip(axes, panels, strict=True):
        sns.lineplot(
            data=table,
            x="epochs",
            y=column,
            hue="tier",
            style="tier",
            palette=palette,
            markers=True,
            dashes=False,
            ax=ax,
        )
        ax.set(xlabel="epochs", ylabel=label)
        count_axis(ax.xaxis, table.epochs)
        ax.legend(title=None)
    for ax in axes[:2]:
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_ylim(bottom=0)
    _bandwidth_lines(axes[3], device_mbps)
    axes[3].legend(title=None, fontsize="small")
    axes[3].set_ylim(bottom=0)
    fig.suptitle("Tier runtime relative to DRAM")
    fig.tight_layout()
    return fig


def _by_method(ax: plt.Axes, table: pd.DataFrame, x: str, y: str) -> None:
    """One line with markers per method (SGD, SWA, SWAG) of `y` against `x`."""
    sns.lineplot(
        data=table,
        x=x,
        y=y,
        hue="method",
        hue_order=METHOD_ORDER,
        palette=METHOD_COLOURS,
        style="method",
        markers=True,
        dashes=False,
        ax=ax,
    )


def quality_vs_rank(table: pd.DataFrame) -> plt.Figure:
    """Accuracy, NLL and ECE of SGD, SWA and SWAG as the posterior grows; columns K, method, ..."""
    _style()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, column in zip(axes, ("accuracy", "nll", "ece"), strict=True):
        _by_method(ax, table, "K", column)
        ax.set(
            xscale="log",
            xlabel="iterates in the posterior (K)",
            ylabel=column.upper() if column != "accuracy" else "accuracy",
        )
        count_axis(ax.xaxis, table.K)
        ax.legend(title=None)
    fig.suptitle("MNIST test: model averaging versus point estimates")
    fig.tight_layout()
    return fig


def rotated(table: pd.DataFrame) -> plt.Figure:
    """Accuracy and NLL against the rotation angle; columns method, angle, accuracy, nll."""
    _style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, column in zip(axes, ("accuracy", "nll"), strict=True):
        _by_method(ax, table, "angle", column)
        ax.set(xlabel="rotation (degrees)", ylabel=column if column == "accuracy" else "NLL")
        ax.xaxis.set_major_locator(MaxNLocator(steps=[1, 3, 4.5, 9], integer=True))
        ax.legend(title=None)
    fig.suptitle("Rotated MNIST")
    fig.tight_layout()
    return fig


def reliability(table: pd.DataFrame, title: str = "Reliability (MNIST test)") -> plt.Figure:
    """Reliability diagram: accuracy against confidence per bin; columns method, confidence,
    accuracy, count (one row per non-empty bin). Methods are drawn in the order they appear."""
    _style()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="calibrated")
    for method in table.method.unique():
        rows = table[table.method == method]
        ax.plot(
            rows.confidence,
            rows.accuracy,
            marker="o",
            label=method,
            color=METHOD_COLOURS.get(method),
        )
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend()
    return fig


def ood(scores: pd.DataFrame, auroc: pd.DataFrame) -> plt.Figure:
    """Predictive entropy in- and out-of-distribution per method, with each method's AUROC.

    scores: columns method, data ("in"/"out"), entropy; auroc: columns method, auroc.
    """
    _style()
    methods = [m for m in METHOD_ORDER if m in set(scores.method)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), sharey=True)
    for ax, method in zip(np.atleast_1d(axes), methods, strict=True):
        rows = scores[scores.method == method]
        sns.histplot(
            data=rows,
            x="entropy",
            hue="data",
            stat="density",
            common_norm=False,
            bins=40,
            element="step",
            ax=ax,
        )
        value = float(auroc.loc[auroc.method == method, "auroc"].iloc[0])
        ax.set(title=f"{method}: AUROC {value:.3f}", xlabel="predictive entropy (nats)")
    fig.suptitle("OOD detection: MNIST (in) versus Fashion-MNIST (out)")
    fig.tight_layout()
    return fig


def sampling(table: pd.DataFrame, device_mbps: dict[str, float], tier: str) -> plt.Figure:
    """Time and effective read rate of drawing S samples from a log on `tier` (its colour): one
    streamed pass versus S passes.

    table: columns S, mode, seconds, read_MBps; device_mbps: {device: sequential read MB/s}.
    """
    _style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, column in zip(axes, ("seconds", "read_MBps"), strict=True):
        sns.lineplot(
            data=table, x="S", y=column, style="mode", color=tier_colour(tier), markers=True, ax=ax
        )
    axes[0].set(yscale="log", xlabel="samples S", ylabel="time (s)")
    plain_log(axes[0].yaxis)
    axes[1].set(xlabel="samples S", ylabel="posterior log read rate (MB/s)")
    _bandwidth_lines(axes[1], device_mbps)
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xscale("log", base=2)
        count_axis(ax.xaxis, table.S)
        ax.legend(title=None)
    fig.suptitle(f"Sampling from the posterior log on {tier}")
    fig.tight_layout()
    return fig


def method_metrics(table: pd.DataFrame, title: str) -> plt.Figure:
    """Accuracy, NLL and ECE per method as bars; `table` is indexed by method."""
    _style()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, column in zip(axes, ("accuracy", "nll", "ece"), strict=True):
        sns.barplot(
            x=table.index,
            y=table[column],
            hue=table.index,
            palette=METHOD_COLOURS,
            saturation=1,
            legend=False,
            ax=ax,
        )
        ax.set(xlabel=None, ylabel=column if column == "accuracy" else column.upper())
        if column == "accuracy":
            ax.set_ylim(max(0.0, float(table[column].min()) - 0.05), 1.0)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def collection_cost(cost: pd.DataFrame) -> plt.Figure:
    """Milliseconds per training step and per collect() of each run; columns run, train_step_s,
    collect_s."""
    _style()
    long = cost.melt(
        id_vars="run", value_vars=["train_step_s", "collect_s"], var_name="what", value_name="s"
    )
    long["ms"] = long.s * 1e3
    long["what"] = long.what.map({"train_step_s": "training step", "collect_s": "swag.collect()"})
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.barplot(
        data=long, x="run", y="ms", hue="what", palette=["0.65", "0.3"], ax=ax
    )  # greys: not tiers
    ax.set(xlabel="run", ylabel="milliseconds", title="Cost of collection per training step")
    ax.legend(title=None)
    return fig


def cluster_scaling(table: pd.DataFrame) -> plt.Figure:
    """Seconds of one sampling pass against dask workers, beside the single-process pass;
    `table` as nvmlib.dask.scaling returns it."""
    _style()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    dask = table[table["mode"] == "dask"]
    sns.lineplot(
        data=dask,
        x="workers",
        y="seconds",
        marker="o",
        errorbar=None,
        label="dask LocalCluster",
        ax=ax,
    )
    ax.axhline(
        table.loc[table["mode"] == "single process", "seconds"].mean(),
        color="C1",
        ls="--",
        label="single process",
    )
    ax.set_xticks(sorted(dask["workers"].unique()))
    ax.set(
        xlabel="dask workers",
        ylabel="sample(S) time (s)",
        ylim=(0, None),
        title="Sampling on a cluster",
    )
    ax.legend()
    return fig
