"""The compressed delta log against raw rows, on real training iterates.

For each model (model_2fc, model_4fc) and regime (the paper's: plain SGD at lr 1e-4 from the first
minibatch; SWAG's: lr 0.05 with momentum 0.9 after a warm-up), ROWS consecutive iterates are
trained into memory, then recorded into a posterior on the mmap tier (O_DIRECT writes) with each
codec: raw rows, delta-zstd and delta-lz4 on 1, 2 and all cores. Reported per run: bytes stored
per iterate, compression ratio against the raw row, and the collection rate in raw bytes per
second (update() of every iterate, then a durable checkpoint) against `dd oflag=direct` measured
in the same run; each setting runs `--repeat` times, interleaved with the others (the machine's
load and the disk drift), after an untimed warm-up, and the median is reported. Then sample(S) on
the raw and the zstd log of the same iterates (O_DIRECT reads: the device is read, not the page
cache), again interleaved.

What the posterior occupies on the disk is measured from its files' blocks (st_blocks, what `du`
counts; not `stored_bytes`), raw against delta-zstd, for the whole log of the iterates and for a
ring of --ring K of them (which wraps: 2K iterates are recorded): the log's files against K raw
rows (K × n_params × 4 bytes), and the whole posterior's directory against the raw one's.

The codec alone (in memory, no I/O) is timed too, encoding and decoding on 1, 2 and all cores:
where its rate per core sits against the device's bandwidth says how many cores the compressed
log needs to collect faster than raw rows can be written.

Where the device is faster than the CPU's decoding (this VM's disk reads ~0.6-1.5 GB/s), sample()
is bound by the CPU. To also measure the case the compressed log is for, a device that bounds the
pass, the sample comparison is repeated with reads throttled to --read-limit MB/s by a cgroup-v1
blkio throttle on DIR's device (needs root and /sys/fs/cgroup/blkio; skipped with a note otherwise).

Usage: python benchmarks/bench_compress.py [DIR] [--models model_2fc,model_4fc] [--rows 48]
           [--samples 16] [--repeat 3] [--read-limit 250] [--ring 50] [--disk-only]
           [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_swag import dd_bandwidth, write_json
from tqdm import tqdm

from nvmlib.backends import open_store
from nvmlib.backends.files import occupied_bytes
from nvmlib.paper import data, models
from nvmlib.paper.train import machine_facts
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.codec import DeltaCodec
from nvmlib.posterior.log import INDEX, LOG

REGIMES = {"paper": (1e-4, 0.0, 0), "swag": (0.05, 0.9, 200)}  # lr, momentum, warm-up steps


def iterates(model_name: str, regime: str, rows: int) -> np.ndarray:
    """`rows` consecutive iterates of `model_name` trained on MNIST in `regime`, as (rows, n)
    float32."""
    lr, momentum, warmup = REGIMES[regime]
    x, y = data.load("mnist", "train").tensors()
    torch.manual_seed(0)
    model = models.make_model(model_name, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    out = np.empty((rows, models.n_params(model)), np.float32)
    for step in range(warmup + rows):
        b = slice(step * 100 % 60000, step * 100 % 60000 + 100)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
        if step >= warmup:
            out[step - warmup] = models.get_flat(model).numpy()
    return out


def collect(where: Path, rows: np.ndarray, codec: str | None, threads: int) -> tuple[float, int]:
    """(seconds to record every row and checkpoint, log bytes stored) on a fresh mmap posterior."""
    os.environ["NVMLIB_CODEC_THREADS"] = str(threads)
    shutil.rmtree(where, ignore_errors=True)
    store = open_store("mmap", where)
    post = SWAGPosterior.create(
        store, rows.shape[1], capacity=len(rows), checkpoint_every=len(rows), codec=codec
    )
    t = time.perf_counter()
    for row in rows:
        post.update(row)
    post.flush()
    seconds = time.perf_counter() - t
    stored = post.log.stored_bytes(0, len(rows))
    post.close()
    store.close()
    return seconds, stored


def disk_bytes(
    where: Path, rows: np.ndarray, codec: str | None, ring: int | None
) -> tuple[int, int]:
    """(bytes the log's files occupy, bytes every file of the posterior occupies) on the disk
    (st_blocks) after recording `rows` into a fresh mmap posterior: the whole log, or a ring of
    `ring`."""
    shutil.rmtree(where, ignore_errors=True)
    with open_store("mmap", where) as store:
        post = SWAGPosterior.create(
            store, rows.shape[1], max_rank=ring, capacity=len(rows), codec=codec
        )
        for row in rows:
            post.update(row)
        post.close()
    log = occupied_bytes(*(where / f"{name}.npy" for name in (LOG, INDEX)))
    return log, occupied_bytes(*where.iterdir())


def footprint(root: Path, rows: np.ndarray, ring: int) -> list[dict]:
    """The disk the raw and the delta-zstd log of `rows` occupy, whole and as a ring of `ring` kept
    iterates (recording 2 × ring of them, so that it wraps), against the raw rows they keep."""
    out = []
    for kept, recorded in ((None, rows), (ring, rows[: 2 * ring])):
        raw_log, raw_all = disk_bytes(root / "disk-raw", recorded, None, kept)
        log, every = disk_bytes(root / "disk-zstd", recorded, "delta-zstd", kept)
        rows_bytes = (kept or len(recorded)) * rows.shape[1] * rows.dtype.itemsize
        out.append(
            {
                "log": "whole" if kept is None else f"ring of {kept}",
                "iterates": len(recorded),
                "raw_rows_bytes": rows_bytes,
                "raw_log_disk": raw_log,
                "raw_posterior_disk": raw_all,
                "zstd_log_disk": log,
                "zstd_posterior_disk": every,
                "log_vs_raw_rows": rows_bytes / log,
                "posterior_vs_raw_posterior": raw_all / every,
            }
        )
    return out


def codec_rates(rows: np.ndarray, codec: str, threads: int) -> tuple[float, float]:
    """GB/s (of raw rows) of the codec alone, in memory: (encode, decode) of every delta of
    `rows`."""
    coder = DeltaCodec(codec, rows.dtype, rows.shape[1], threads)
    coder.decode(
        memoryview(b"".join(coder.encode(rows[1], rows[0]))), rows[0], np.empty_like(rows[0])
    )  # warm-up
    t = time.perf_counter()
    records = [b"".join(coder.encode(rows[i], rows[i - 1])) for i in range(1, len(rows))]
    encode = time.perf_counter() - t
    out = np.empty_like(rows[0])
    t = time.perf_counter()
    for i, record in enumerate(records):
        coder.decode(memoryview(record), rows[i], out)
    decode = time.perf_counter() - t
    coder.close()
    return rows[1:].nbytes / encode / 1e9, rows[1:].nbytes / decode / 1e9


BLKIO = Path("/sys/fs/cgroup/blkio")


class ReadLimit:
    """A cgroup-v1 blkio throttle of reads from `where`'s device, for this whole process while
    entered."""

    def __init__(self, where: Path, mbps: int) -> None:
        dev = os.stat(where).st_dev
        self.group, self.rule = (
            BLKIO / "nvmlib-bench",
            f"{os.major(dev)}:{os.minor(dev)} {mbps * 10**6}",
        )

    def available(self) -> str:
        """ "" when the throttle can be set here, else why not."""
        if os.geteuid() != 0 or not (BLKIO / "cgroup.procs").exists():
            return "needs root and a cgroup-v1 blkio hierarchy at /sys/fs/cgroup/blkio"
        return ""

    def __enter__(self) -> "ReadLimit":
        self.group.mkdir(exist_ok=True)
        (self.group / "blkio.throttle.read_bps_device").write_text(self.rule)
        (self.group / "cgroup.procs").write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        (BLKIO / "cgroup.procs").write_text(str(os.getpid()))
        self.group.rmdir()


def sample_seconds(where: Path, S: int, seed: int) -> float:
    """Seconds of sample(S) on the posterior at `where`."""
    with open_store("mmap", where, readonly=True) as store:
        post = SWAGPosterior.open(store, readonly=True)
        t = time.perf_counter()
        post.sample(S, seed=seed)
        seconds = time.perf_counter() - t
        post.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dir", nargs="?", help="directory on the device to measure (default: a temp dir)"
    )
    parser.add_argument("--models", default="model_2fc,model_4fc")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--read-limit", type=int, default=250, help="MB/s of the throttled device (0: none)"
    )
    parser.add_argument(
        "--ring", type=int, default=50, help="iterates a ring keeps in the disk measurement"
    )
    parser.add_argument(
        "--disk-only", action="store_true", help="measure the disk footprint only (no timings)"
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-compress-"))
    cores = os.cpu_count() or 1
    report = {
        "machine": machine_facts(torch.device("cpu")),
        "rows": args.rows,
        "load_before": os.getloadavg(),
        "dd_before": dd_bandwidth(root),
        "runs": [],
        "sample": [],
    }
    dd_write = report["dd_before"]["dd_write_over_MBps"]
    print(
        f"dd oflag=direct: {dd_write:.0f} MB/s overwrite, "
        f"{report['dd_before']['dd_read_MBps']:.0f} MB/s read"
    )
    settings = [(None, cores)] + [
        (c, n) for c in ("delta-zstd", "delta-lz4") for n in sorted({1, 2, cores})
    ]
    for model_name in args.models.split(","):
        for regime in REGIMES:
            rows = iterates(model_name, regime, max(args.rows, 2 * args.ring))
            for disk in footprint(root, rows, args.ring):
                report.setdefault("disk", []).append(
                    {"model": model_name, "regime": regime, **disk}
                )
                print(
                    f"{model_name:9s} {regime:5s} {disk['log']:10s} "
                    f"({disk['iterates']} iterates) on the disk: "
                    f"raw rows {disk['raw_rows_bytes'] / 1e6:.1f} MB, "
                    f"raw log {disk['raw_log_disk'] / 1e6:.1f} MB, "
                    f"zstd log {disk['zstd_log_disk'] / 1e6:.1f} MB = "
                    f"{disk['log_vs_raw_rows']:.2f}x less than the raw rows; "
                    f"whole posterior {disk['posterior_vs_raw_posterior']:.2f}x less"
                )
            if args.disk_only:
                continue
            rows = rows[: args.rows]
            raw_row = rows.shape[1] * 4
            for (
                codec,
                threads,
            ) in settings:  # warm-up: compile and load the kernels, start the threads
                collect(root / "warm-up", rows[:4], codec, threads)
            times: dict[tuple, list[float]] = {}
            stored_of: dict[tuple, int] = {}
            for _ in tqdm(range(args.repeat), desc=f"{model_name} {regime}", leave=False):
                for codec, threads in settings:
                    seconds, stored_of[codec, threads] = collect(
                        root / f"{codec}", rows, codec, threads
                    )
                    times.setdefault((codec, threads), []).append(seconds)
            for codec, threads in settings:
                seconds, stored = float(np.median(times[codec, threads])), stored_of[codec, threads]
                run = {
                    "model": model_name,
                    "regime": regime,
                    "codec": codec or "raw",
                    "threads": threads,
                    "bytes_per_iterate": stored / len(rows),
                    "ratio": raw_row * len(rows) / stored,
                    "collect_MBps": raw_row * len(rows) / seconds / 1e6,
                }
                run["collect_vs_dd_write"] = run["collect_MBps"] / dd_write
                report["runs"].append(run)
                tqdm.write(
                    f"{model_name:9s} {regime:5s} {run['codec']:10s} {threads} threads: "
                    f"{run['bytes_per_iterate'] / 1e6:6.2f} MB/iterate "
                    f"(ratio {run['ratio']:4.2f}), collect {run['collect_MBps']:6.0f} MB/s = "
                    f"{run['collect_vs_dd_write']:.2f}x dd write"
                )
            for codec, threads in settings[1:]:
                encode, decode = codec_rates(rows, codec, threads)
                report["codec"] = report.get("codec", []) + [
                    {
                        "model": model_name,
                        "regime": regime,
                        "codec": codec,
                        "threads": threads,
                        "encode_GBps": encode,
                        "decode_GBps": decode,
                    }
                ]
                print(
                    f"{model_name:9s} {regime:5s} {codec:10s} {threads} threads in memory: "
                    f"encode {encode:.2f} GB/s, decode {decode:.2f} GB/s"
                )
            limit = ReadLimit(root, args.read_limit) if args.read_limit else None
            why = limit.available() if limit else "--read-limit 0"
            if why:
                report["read_limit_skipped"] = why
            for device, throttle in (
                ("this VM's disk", None),
                (f"reads limited to {args.read_limit} MB/s", limit),
            ):
                if device != "this VM's disk" and why:
                    continue
                pair = {}
                with throttle or contextlib.nullcontext():
                    for seed in range(args.repeat):
                        for codec in (None, "delta-zstd"):
                            pair.setdefault(codec, []).append(
                                sample_seconds(root / f"{codec}", args.samples, seed)
                            )
                raw_s, packed_s = float(np.median(pair[None])), float(np.median(pair["delta-zstd"]))
                report["sample"].append(
                    {
                        "model": model_name,
                        "regime": regime,
                        "S": args.samples,
                        "device": device,
                        "raw_s": raw_s,
                        "delta_zstd_s": packed_s,
                        "ratio": packed_s / raw_s,
                    }
                )
                print(
                    f"{model_name:9s} {regime:5s} sample({args.samples}), {device}: "
                    f"raw {raw_s:.3f} s, delta-zstd {packed_s:.3f} s = {packed_s / raw_s:.2f}x"
                )
    report["dd_after"], report["load_after"] = dd_bandwidth(root), os.getloadavg()
    print(
        f"load average {report['load_before'][0]:.1f} before, "
        f"{report['load_after'][0]:.1f} after; "
        f"dd after: {report['dd_after']['dd_write_over_MBps']:.0f} MB/s overwrite, "
        f"{report['dd_after']['dd_read_MBps']:.0f} MB/s read"
    )
    shutil.rmtree(root, ignore_errors=True)
    write_json(args.json, report)


if __name__ == "__main__":
    main()
