"""What a reproduction needs before it starts: each notebook's peak memory and disk at a preset.

A notebook's needs are computed from its preset parameters by the function registered for it in
NEEDS (`needs_of` falls back to the bare kernel for a notebook that declares none). Notebooks run
one after another in their own kernel and remove their scratch posteriors, so the plan needs the
largest of their peaks; posteriors kept at an explicit path stay and add up. `Plan.shortfalls`
compares a plan with what a machine has, phrased as need versus have (nvmlib.paper.reproduce refuses
a run that does not fit before any work starts).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

GB = 1e9
# a Jupyter kernel with torch, numpy, pandas and matplotlib imported and a small model trained:
# 0.63-0.69 GB of peak RSS in this project's smoke runs (data included), rounded up
KERNEL_BYTES = 1 << 30
# a dask worker process with torch, zarr and nvmlib imported: 0.34 GB measured, plus a task's shards
WORKER_BYTES = 600 << 20
TRAIN_EXAMPLES, TEST_EXAMPLES, PIXELS = 60_000, 10_000, 28 * 28
BATCH_SIZE = 100
PROBE_BYTES = 1 << 30  # the notebooks' default probe_bytes


@dataclass(frozen=True)
class Needs:
    """Bytes one notebook holds at its peak: resident memory above the bare kernel, scratch disk
    (removed when the notebook ends) and disk at explicit posterior paths (kept)."""

    memory: int = 0
    scratch: int = 0
    kept: Mapping[str, int] = field(default_factory=dict)

    def __add__(self, other: "Needs") -> "Needs":
        """Both at once."""
        kept = dict(self.kept)
        for path, n in other.kept.items():
            kept[path] = kept.get(path, 0) + n
        return Needs(self.memory + other.memory, self.scratch + other.scratch, kept)


def one_after_another(needs: Iterable[Needs]) -> Needs:
    """The peak of phases that run in turn: the largest memory and scratch; kept paths add up."""
    total = Needs()
    for n in needs:
        total = Needs(max(total.memory, n.memory), max(total.scratch, n.scratch), (total + n).kept)
    return total


# ---- the pieces a notebook's needs are made of ---------------------------------------------------
def n_params(model: str) -> int:
    """Parameters of one of the paper's models (nvmlib.paper.models)."""
    from nvmlib.paper.models import make_model
    from nvmlib.paper.models import n_params as count

    return count(make_model(model))


def posterior_bytes(n: int, rows: int, dtype: str = "float32") -> int:
    """Bytes of a posterior keeping `rows` iterates of `n` parameters
    (SWAGPosterior.required_bytes)."""
    from nvmlib.posterior import SWAGPosterior

    return SWAGPosterior.required_bytes(n, rows, dtype)


def kept_rows(p: Mapping[str, Any], epochs: int | None = None) -> int:
    """Iterates a training run with parameters `p` keeps (train.train's capacity, capped by
    max_rank)."""
    batches = math.ceil((p.get("limit") or TRAIN_EXAMPLES) / p.get("batch_size", BATCH_SIZE))
    epochs = p["epochs"] if epochs is None else epochs
    rows = 1 + (epochs - p.get("swag_start", 0)) * math.ceil(batches / p.get("record_every", 1))
    return min(rows, p["max_rank"]) if p.get("max_rank") else rows


def on_tier(tier: str, path: str | None, nbytes: int) -> Needs:
    """`nbytes` kept on a tier: memory for dram, the path's disk when given, else scratch disk."""
    if tier == "dram":
        return Needs(memory=nbytes)
    if path is not None:
        return Needs(kept={path: nbytes})
    return Needs(scratch=nbytes)


def data_bytes(p: Mapping[str, Any]) -> int:
    """MNIST in memory: the training split (uint8 and its float32 tensor) and the test splits."""
    train = (p.get("limit") or TRAIN_EXAMPLES) * PIXELS * 5
    test = (p.get("test_limit") or TEST_EXAMPLES) * PIXELS * 5 * 2  # MNIST and Fashion-MNIST
    return train + test


def samples_bytes(model: str, samples: int) -> int:
    """SWAGPosterior.sample(S): the draws and the low-rank accumulator, float32."""
    return 2 * samples * n_params(model) * 4


def probe(p: Mapping[str, Any]) -> Needs:
    """The device bandwidth probe's temporary file."""
    return Needs(scratch=p.get("probe_bytes", PROBE_BYTES))


# ---- each notebook's needs -----------------------------------------------------------------------
def collect(p: Mapping[str, Any]) -> Needs:
    post = on_tier(
        p["tier"], p.get("posterior_path"), posterior_bytes(n_params(p["model"]), kept_rows(p))
    )
    run = post + Needs(memory=data_bytes(p) + samples_bytes(p["model"], p["samples"]))
    return one_after_another([run, probe(p)])


def tier_runtime(p: Mapping[str, Any]) -> Needs:
    size = posterior_bytes(n_params(p["model"]), kept_rows(p, max(p["epochs"])))
    tiers = [
        on_tier(tier, path, size) + Needs(memory=data_bytes(p))
        for tier, path in p["tiers"].values()
    ]
    return one_after_another([*tiers, probe(p)])


def posterior_quality(p: Mapping[str, Any]) -> Needs:
    n = n_params(p["model"])
    log = on_tier(p["tier"], p.get("posterior_path"), posterior_bytes(n, kept_rows(p)))
    replay = on_tier(
        p.get("replay_tier", "dram"), p.get("replay_path"), posterior_bytes(n, max(p["ranks"]))
    )
    run = log + replay + Needs(memory=data_bytes(p) + samples_bytes(p["model"], p["samples"]))
    return one_after_another([run, probe(p)])


def sampling(p: Mapping[str, Any]) -> Needs:
    log = on_tier(
        p["tier"], p.get("posterior_path"), posterior_bytes(n_params(p["model"]), p["rank"])
    )
    run = log + Needs(memory=samples_bytes(p["model"], max(p["sample_counts"])))
    return one_after_another([run, probe(p)])


def any_model(p: Mapping[str, Any]) -> Needs:
    """`runs` posteriors of `max_rank` iterates of the convnet, all open for MultiSWAG, then one
    more (the Lightning run) (tier: the notebook's mmap unless the preset says)."""
    from nvmlib.paper.any_model import convnet

    n = sum(t.numel() for t in convnet(p["width"]).parameters())
    posts = on_tier(
        p.get("tier", "mmap"),
        p.get("posterior_path"),
        (p["runs"] + 1) * posterior_bytes(n, p["max_rank"]),
    )
    return one_after_another([posts + Needs(memory=data_bytes(p)), probe(p)])


def cluster(p: Mapping[str, Any]) -> Needs:
    """A zarr posterior in scratch, the draws, and a LocalCluster of up to max(worker_counts)
    worker processes."""
    log = on_tier("zarr", None, posterior_bytes(n_params(p["model"]), kept_rows(p)))
    workers = max(p["worker_counts"]) * WORKER_BYTES
    return one_after_another(
        [
            log + Needs(memory=data_bytes(p) + samples_bytes(p["model"], p["samples"]) + workers),
            probe(p),
        ]
    )


# notebook -> its needs from its parameters; a notebook adds its own function here
NEEDS: dict[str, Callable[[Mapping[str, Any]], Needs]] = {
    "collect": collect,
    "tier_runtime": tier_runtime,
    "posterior_quality": posterior_quality,
    "sampling": sampling,
    "any_model": any_model,
    "cluster": cluster,
}


def needs_of(notebook: str, parameters: Mapping[str, Any]) -> Needs:
    """Peak needs of `notebook` run with `parameters`, the bare kernel included."""
    extra = NEEDS[notebook](parameters) if notebook in NEEDS else Needs()
    return extra + Needs(memory=KERNEL_BYTES)


# ---- what the machine has ------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """Memory available without swapping, total memory, and a function giving free disk bytes under
    a path."""

    memory_available: int
    memory_total: int
    disk_free: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free

    @classmethod
    def here(cls) -> "Machine":
        """This machine now (MemAvailable from /proc/meminfo where there is one)."""
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            available = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            available = total
        return cls(available, total)


def existing(path: Path) -> Path:
    """`path` or its nearest existing parent (where a directory to be made would live)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


@dataclass(frozen=True)
class Plan:
    """The peak needs of a run of several notebooks and where its disk needs fall."""

    needs: Needs
    scratch_dir: Path
    by_notebook: dict[str, Needs]

    def disk(self) -> dict[Path, int]:
        """Bytes needed under each place (devices such as devdax are not files: skipped)."""
        out: dict[Path, int] = {}
        for path, n in [
            (self.scratch_dir, self.needs.scratch),
            *((Path(p), n) for p, n in self.needs.kept.items()),
        ]:
            if not str(path).startswith("/dev/"):
                out[path] = out.get(path, 0) + n
        return out

    def shortfalls(self, machine: Machine) -> list[str]:
        """What this plan needs and the machine has not, each phrased as need versus have."""
        short = []
        if self.needs.memory > machine.memory_available:
            top = max(self.by_notebook, key=lambda k: self.by_notebook[k].memory)
            short.append(
                f"memory: needs {size(self.needs.memory)} at its peak ({top}), this machine has "
                f"{size(machine.memory_available)} available of {size(machine.memory_total)}"
            )
        by_device: dict[
            int, tuple[Path, list[Path], int]
        ] = {}  # file system -> (a place on it, paths, bytes)
        for path, n in self.disk().items():
            where = existing(path)
            first, paths, total = by_device.get(where.stat().st_dev, (where, [], 0))
            by_device[where.stat().st_dev] = (first, [*paths, path], total + n)
        for where, paths, n in by_device.values():
            free = machine.disk_free(where)
            if n > free:
                short.append(
                    f"disk: needs {size(n)} under {', '.join(map(str, paths))}, "
                    f"whose file system has {size(free)} free"
                )
        return short

    def summary(self) -> str:
        disk = ", ".join(f"{size(n)} under {where}" for where, n in self.disk().items())
        return f"needs {size(self.needs.memory)} of memory at its peak and {disk or 'no disk'}"


def size(nbytes: int) -> str:
    """Bytes for people: GB, or MB below 0.1 GB."""
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB / 10 else f"{nbytes / 1e6:.0f} MB"


def plan(parameters: Mapping[str, Mapping[str, Any]], scratch_dir: str | Path) -> Plan:
    """The plan of running each notebook in `parameters` ({notebook: its parameters}) in turn."""
    by = {name: needs_of(name, p) for name, p in parameters.items()}
    return Plan(one_after_another(by.values()), Path(scratch_dir), by)
