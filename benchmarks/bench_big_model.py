"""A GPT-2-small-size language model (>= 100 M parameters) with its SWAG posterior on the mmap
tier, in a log larger than this machine's RAM.

A decoder-only transformer (plain torch, random initialisation, nothing downloaded; 16 layers,
768 wide, 12 heads, context 128, a byte-level vocabulary of 256) is trained with AdamW on the
Python standard library's own source files (every machine has them; every 20th file is held
out). The first steps run without collection, then `swag.collect()` follows every step until
the log holds K iterates, K = max(64, RAM × --ram-multiple / iterate bytes), so the log is
larger than RAM. Then a held-out perplexity: the last iterate's, the SWA mean's, and the SWAG
Bayesian model average over S sampled models, streamed one model at a time. A second, shorter
run (--codec-steps, max_rank = that) continues training into a delta-zstd log to compare its
bytes on disk (st_blocks) with the raw rows'. `dd oflag=direct` / `iflag=direct` run on the
same directory in the same run.

Reports (printed, and as JSON): the parameter count, peak RSS (getrusage) after the model and
optimizer, after collection and after sampling, step time without and with `collect()`
(medians), the logs' bytes on disk, the three perplexities and the dd figures. The posteriors
are removed at the end. --quick: a ~10 M-parameter model, a few steps, a small K (minutes).

Usage: python benchmarks/bench_big_model.py [DIR] [--quick] [-S 8] [--json out.json]
       (the full run writes results/bench/big_model.json unless --json says otherwise)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_beyond_ram import mem_total, peak_rss
from bench_swag import dd, dd_bandwidth, write_json
from torch import nn
from tqdm import tqdm

from nvmlib import SWAG, SWAGPosterior
from nvmlib.paper.train import machine_facts, resolve_device
from nvmlib.posterior.log import INDEX, LOG

VOCAB = 256  # bytes
HOLDOUT_EVERY = 20  # every 20th source file is held out: 5 %
CODEC = "delta-zstd"
DEFAULT_JSON = Path(__file__).resolve().parents[1] / "results" / "bench" / "big_model.json"


@dataclass(frozen=True)
class Config:
    """The model and the run's sizes."""

    layers: int
    width: int
    heads: int
    context: int
    batch: int
    plain_steps: int  # steps timed without collect()
    min_rank: int  # K is at least this (the log's kept iterates, one per collected step)
    codec_steps: int  # steps of the delta-zstd run (its max_rank too)
    eval_windows: int  # held-out sequences of `context` bytes
    lr: float = 6e-4


FULL = Config(
    layers=16,
    width=768,
    heads=12,
    context=128,
    batch=2,
    plain_steps=4,
    min_rank=64,
    codec_steps=8,
    eval_windows=16,
)
QUICK = Config(
    layers=6,
    width=384,
    heads=6,
    context=64,
    batch=2,
    plain_steps=2,
    min_rank=4,
    codec_steps=3,
    eval_windows=4,
)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a 4× MLP, GPT-2 style."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    """A decoder-only language model over bytes: logits (B, T, 256) for inputs (B, T)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, cfg.width), nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.Sequential(*(Block(cfg.width, cfg.heads) for _ in range(cfg.layers)))
        self.ln, self.head = nn.LayerNorm(cfg.width), nn.Linear(cfg.width, VOCAB, bias=False)
        for p in self.parameters():  # GPT-2's initialisation
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.ln(self.blocks(h)))


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """The standard library's .py files as bytes (uint8): the training part and the held-out
    part (every HOLDOUT_EVERY-th file in sorted order); installed packages are left out."""
    root = Path(os.__file__).parent
    files = sorted(
        f
        for f in root.rglob("*.py")
        if "site-packages" not in f.parts and "dist-packages" not in f.parts
    )
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    for i, f in enumerate(tqdm(files, desc="reading the standard library", unit="file")):
        parts[i % HOLDOUT_EVERY == 0].append(f.read_bytes())
    train, test = (np.frombuffer(b"".join(p), np.uint8) for p in parts)
    return train, test


def windows(data: np.ndarray, count: int, context: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` random sequences of context + 1 bytes of `data`, (count, context + 1) int64."""
    starts = rng.integers(0, len(data) - context - 1, count)
    return torch.from_numpy(np.stack([data[s : s + context + 1] for s in starts]).astype(np.int64))


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: np.ndarray,
    cfg: Config,
    rng: np.random.Generator,
    steps: int,
    swag: SWAG | None,
    desc: str,
) -> list[float]:
    """Seconds of each of `steps` AdamW steps, `swag.collect()` after each when swag is given."""
    device = next(model.parameters()).device
    seconds = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        batch = windows(data, cfg.batch, cfg.context, rng).to(device)
        t = time.perf_counter()
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if swag is not None:
            swag.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return seconds


@torch.no_grad()
def target_probs(model: nn.Module, held_out: torch.Tensor, batch: int) -> np.ndarray:
    """The probability `model` gives each held-out next byte, (windows × context,) float64."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(held_out), batch):
        w = held_out[i : i + batch].to(device)
        logp = torch.log_softmax(model(w[:, :-1]).float(), dim=-1)
        out.append(logp.gather(-1, w[:, 1:, None]).reshape(-1).double().exp().cpu())
    return torch.cat(out).numpy()


def perplexity(probs: np.ndarray) -> float:
    """exp of the mean negative log-probability of the held-out bytes."""
    return float(math.exp(-np.log(probs).mean()))


DRAW_BUDGET = 1 << 30  # bytes of draws held in memory; beyond it they go to a scratch tier


def draw_models(swag: SWAG, S: int, seed: int) -> Iterator[nn.Module]:
    """The S sampled models, one at a time, their draws on a scratch mmap store beside the
    posterior once S × P × 4 bytes exceed DRAW_BUDGET: the one place the benchmark samples."""
    return swag.sample_models(S, seed=seed, memory_budget=DRAW_BUDGET)


def disk_bytes(directory: Path, prefixes: tuple[str, ...] = ("",)) -> int:
    """Bytes the files under `directory` whose names start with one of `prefixes` occupy on
    disk (st_blocks × 512: what the file system allocated, not the files' lengths)."""
    return sum(
        f.stat().st_blocks * 512
        for f in directory.rglob("*")
        if f.is_file() and f.name.startswith(prefixes)
    )


def check_room(base: Path, need: int, what: str) -> None:
    """Refuse, before anything is written, a run whose posteriors do not fit on `base`'s disk."""
    probe = next(p for p in (base, *base.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if free < need:
        raise SystemExit(
            f"bench_big_model: {probe} has {free / 1e9:.1f} GB free but {what} needs "
            f"{need / 1e9:.1f} GB: choose a directory on a larger disk (the DIR "
            "argument) or lower --ram-multiple (the log then may not exceed RAM)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", help="directory for the posteriors (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="a ~10 M-parameter model, few steps")
    p.add_argument(
        "--ram-multiple",
        type=float,
        default=1.1,
        help="the raw log holds at least this × RAM (not with --quick)",
    )
    p.add_argument("-S", dest="samples", type=int, default=None, help="sampled models (8; quick 2)")
    p.add_argument("-c", dest="gpu", type=int, default=-1, help="CUDA device id (-1: CPU)")
    p.add_argument("--json", help=f"write the figures here (full run: {DEFAULT_JSON})")
    args = p.parse_args()
    cfg = QUICK if args.quick else FULL
    S = args.samples or (2 if args.quick else 8)
    device = resolve_device(args.gpu)
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_big_model-"))

    torch.manual_seed(0)
    model = ByteGPT(cfg).to(device)
    n = sum(q.numel() for q in model.parameters())
    row = 4 * n
    ram = mem_total()
    K = cfg.min_rank if args.quick else max(cfg.min_rank, math.ceil(args.ram_multiple * ram / row))
    raw_need = SWAGPosterior.required_bytes(n, K)
    need = max(raw_need, SWAGPosterior.required_bytes(n, cfg.codec_steps, codec=CODEC), 2 << 30)
    check_room(base, need + (1 << 30), f"a raw log of {K} iterates × {n:,} parameters")
    base.mkdir(parents=True, exist_ok=True)
    print(
        f"{n:,} parameters ({row / 1e6:.0f} MB per iterate); K = {K}: log "
        f"{K * row / 1e9:.1f} GB = {K * row / ram:.2f} × RAM ({ram / 1e9:.1f} GB)"
    )
    bw = dd_bandwidth(base, 2048)
    train_data, test_data = corpus()
    rng = np.random.default_rng(0)
    held_out = windows(test_data, cfg.eval_windows, cfg.context, np.random.default_rng(1))
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )  # one kernel per step: 2.5x faster than the loop on a CPU

    plain = train(model, opt, train_data, cfg, rng, cfg.plain_steps, None, "training")
    rss_model_opt = peak_rss()  # weights, gradients, AdamW's two moments
    report: dict[str, Any] = {
        "quick": args.quick,
        "config": asdict(cfg),
        "n_params": n,
        "iterate_bytes": row,
        "ram_bytes": ram,
        "K": K,
        "samples": S,
        "dd": bw,
        "device": str(device),
    }
    raw_dir, codec_dir = base / "raw", base / "delta"
    try:
        swag = SWAG(model, "mmap", raw_dir, max_rank=K, overwrite=True)
        try:
            collect = train(model, opt, train_data, cfg, rng, K, swag, f"collecting {K} iterates")
            t = time.perf_counter()
            swag.flush()
            flush_s = time.perf_counter() - t
            rss_collect = peak_rss()
            log_file = next(raw_dir.glob(f"{LOG}*"))
            log_disk = disk_bytes(raw_dir, (LOG, INDEX))
            row_disk = log_disk / swag.posterior.store.shape(LOG)[0]  # a raw row and its trailer
            dd_read_s = dd(f"if={log_file}", "of=/dev/null", "iflag=direct")
            report.update(evaluate(swag, model, held_out, cfg, S))
            rss_sample = peak_rss()
            report.update(
                {
                    "log_bytes": swag.posterior.store.nbytes(LOG),
                    "log_disk_bytes": log_disk,
                    "posterior_disk_bytes": disk_bytes(raw_dir),
                    "log_vs_ram": log_disk / ram,
                    "log_exceeds_ram": log_disk > ram,
                    "dd_read_log_s": dd_read_s,
                    "sample_vs_dd_read": report["sample_s"] / dd_read_s,
                }
            )
        finally:
            swag.close()
            shutil.rmtree(raw_dir, ignore_errors=True)
        with SWAG(model, "mmap", codec_dir, max_rank=cfg.codec_steps, codec=CODEC) as delta:
            coded = train(
                model,
                opt,
                train_data,
                cfg,
                rng,
                cfg.codec_steps,
                delta,
                f"collecting {cfg.codec_steps} iterates, {CODEC}",
            )
            delta.flush()
            post = delta.posterior  # the bytes of the log's records themselves
            stored = post.log.stored_bytes(post.n_collected - post.rank, post.n_collected)
            coded_disk = disk_bytes(codec_dir, (LOG, INDEX))
    finally:
        shutil.rmtree(codec_dir, ignore_errors=True)
    raw_same_rows = row_disk * cfg.codec_steps  # as many raw rows on disk
    footprint = 4 * row  # weights, gradients, AdamW's exp_avg and exp_avg_sq
    rss = peak_rss()
    report.update(
        {
            "step_s": {
                "plain_median": float(np.median(plain)),
                "collect_median": float(np.median(collect)),
                "collect_max": max(collect),
                "overhead": float(np.median(collect) / np.median(plain)),
                "codec_collect_median": float(np.median(coded)),
                "flush_s": flush_s,
                "plain": plain,
                "collect": collect,
                "codec_collect": coded,
            },
            "codec": {
                "codec": CODEC,
                "steps": cfg.codec_steps,
                "max_rank": cfg.codec_steps,
                "run": "a second run continuing training after the raw one",
                "log_disk_bytes": coded_disk,
                "log_stored_bytes": stored,
                "raw_disk_bytes_same_rows": raw_same_rows,
                "disk_saving": raw_same_rows / coded_disk,
            },
            "rss": {
                "after_model_optimizer": rss_model_opt,
                "after_collection": rss_collect,
                "after_sampling": rss_sample,
                "peak": rss,
                "model_optimizer_bytes": footprint,
                "peak_above_model_optimizer": rss - footprint,
            },
            "machine": machine_facts(device),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    summarise(report)
    write_json(args.json or (None if args.quick else str(DEFAULT_JSON)), report)


def evaluate(
    swag: SWAG, model: nn.Module, held_out: torch.Tensor, cfg: Config, S: int
) -> dict[str, Any]:
    """Held-out perplexities of the last iterate (`model`), the SWA mean and the BMA of S
    models drawn from one pass over the log, each model dropped before the next is loaded."""
    batch = cfg.batch * 4
    last = perplexity(target_probs(model, held_out, batch))
    model.train()
    swa = perplexity(target_probs(swag.mean_model(), held_out, batch))
    t = time.perf_counter()
    models = draw_models(swag, S, seed=0)
    sample_s = time.perf_counter() - t
    total, each = 0.0, []
    for m in tqdm(models, total=S, desc=f"held-out perplexity of {S} models", unit="model"):
        probs = target_probs(m, held_out, batch)
        total = total + probs
        each.append(perplexity(probs))
        del m
    eval_s = time.perf_counter() - t - sample_s
    return {
        "perplexity": {
            "last_iterate": last,
            "swa_mean": swa,
            "swag_bma": perplexity(total / S),
            "samples": each,
            "uniform": float(VOCAB),
            "held_out_bytes": held_out[:, 1:].numel(),
        },
        "sample_s": sample_s,
        "eval_s": eval_s,
    }


def summarise(r: dict[str, Any]) -> None:
    """Print the figures."""
    s, c, rss, ppl = r["step_s"], r["codec"], r["rss"], r["perplexity"]
    print(
        f"{r['n_params']:,} parameters; raw log of {r['K']} iterates: "
        f"{r['log_disk_bytes'] / 1e9:.1f} GB on disk = {r['log_vs_ram']:.2f} × RAM"
    )
    print(
        f"step {s['plain_median']:.2f} s without collect(), {s['collect_median']:.2f} s with "
        f"({s['overhead']:.3f}x; slowest {s['collect_max']:.2f} s; final flush "
        f"{s['flush_s']:.2f} s)"
    )
    raw = c["raw_disk_bytes_same_rows"]
    print(
        f"{c['codec']} ({c['steps']} iterates): {c['log_disk_bytes'] / 1e9:.2f} GB on disk "
        f"(records {c['log_stored_bytes'] / 1e9:.2f} GB) against {raw / 1e9:.2f} GB of as "
        f"many raw rows: raw / compressed = {c['disk_saving']:.2f}x"
    )
    print(
        f"held-out perplexity: last iterate {ppl['last_iterate']:.2f}, SWA mean "
        f"{ppl['swa_mean']:.2f}, SWAG BMA of {r['samples']} {ppl['swag_bma']:.2f}"
    )
    print(
        f"sampling {r['samples']} models {r['sample_s']:.1f} s = {r['sample_vs_dd_read']:.2f} × "
        f"dd iflag=direct of the log ({r['dd_read_log_s']:.1f} s); evaluating them "
        f"{r['eval_s']:.1f} s"
    )
    print(
        f"dd oflag=direct {r['dd']['dd_write_fresh_MBps']:.0f} MB/s, iflag=direct "
        f"{r['dd']['dd_read_MBps']:.0f} MB/s"
    )
    print(
        "peak RSS " + ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f} GB" for k, v in rss.items())
    )


if __name__ == "__main__":
    main()
