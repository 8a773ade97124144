"""What a posterior is on a store: its arrays, their shapes, and the checksummed meta that names
them.

swag.meta     uint8: JSON (n_params, max_rank, capacity, the log's layout, moments_len, dtype,
              checkpoint_every, model, deviations: "final" or "running", what D's rows are
              centred on; id: a random identity), a newline, its digest in hex
swag.log      the iterates, a ring when max_rank is set (nvmlib.posterior.log): raw rows, or
(swag.index)  compressed XOR-deltas of consecutive iterates with an index
swag.count    int64 (2,): [updates whose row is fully written, its digest]
swag.shift    float64 (n_params,): the first iterate; moments are kept relative to it
swag.moments  float64 (2, 2, moments_len): two checkpoint slots of [Σ(θ−θ₀), Σ(θ−θ₀)²]
              (n_params padded to 4 KiB, like the log's rows: one layout on every tier)
swag.commit   int64 (2, 6): per slot [seq, count, digest of the slot's moments, digest of the
              shift, the posterior's identity, digest of the record]
swag.moments.live, swag.moments.saved
              float64 (2 × moments_len,) and (2 × moments_len + n_params,): only while a writer
              with moments="store" has the posterior open (its live sums, and their copy while
              a refusable call runs); not part of the format
"""

from __future__ import annotations

import json
import resource
from typing import Any

import numpy as np

from nvmlib.backends.base import ALIGN, Store, padded_len
from nvmlib.errors import InputError, PosteriorError, StoreError
from nvmlib.posterior.checksum import digest, new_identity
from nvmlib.posterior.codec import check_codec
from nvmlib.posterior.log import INDEX, LOG, layout, log_bytes, log_class

FORMAT = 3
META, COUNT, SHIFT, MOMENTS, COMMIT = (
    "swag.meta",
    "swag.count",
    "swag.shift",
    "swag.moments",
    "swag.commit",
)
# a writer's scratch arrays for moments="store" (moments_store): the live sums, and their copy
# while a call that may be refused runs; rebuilt from the checkpoint slots at every open
LIVE, SAVED = "swag.moments.live", "swag.moments.saved"
NAMES = (META, LOG, INDEX, COUNT, SHIFT, MOMENTS, COMMIT, LIVE, SAVED)
FLOAT_DTYPES = ("float16", "float32", "float64")
DEVIATIONS = ("final", "running")  # D's rows centred on the final mean, or on the running means
MAX_CHUNK = 32  # iterates per chunk of a compressed log (a keyframe, then deltas), at most


def chunk_for(capacity: int) -> int:
    """Iterates per chunk of a compressed log keeping `capacity`: long chunks store fewer keyframes,
    short ones keep (and decode) fewer iterates beyond the kept ones; a quarter of them, 2 to
    MAX_CHUNK."""
    return int(min(MAX_CHUNK, max(2, capacity // 4)))


def required_bytes(
    n_params: int, rows: int, dtype: str = "float32", codec: str | None = None, grows: bool = False
) -> int:
    """Bytes a posterior of `rows` kept iterates needs on a tier (the log has room for the next
    row, a compressed log for a chunk more): a compressed log's records counted at
    log.ASSUMED_RATIO of raw rows where the tier grows (Store.grows), else at their worst case."""
    log = log_bytes(
        {
            "n_params": n_params,
            "capacity": rows,
            "dtype": dtype,
            **layout(n_params, rows, dtype, codec, chunk_for(rows)),
        },
        grows,
    )
    return log + (4 * padded_len(n_params, "float64", ALIGN) + n_params) * 8 + 8 * 4096


def _integer(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
        raise InputError(f"{name} must be an integer, not {value!r}")


def check_max_rank(max_rank: Any) -> None:
    """max_rank is None (keep every iterate) or a whole number >= 2, or an InputError."""
    _integer("max_rank", max_rank)
    if max_rank is not None and max_rank < 2:
        raise InputError(
            f"max_rank={max_rank}: the low-rank part needs at least 2 iterates "
            "(K−1 divides D Dᵀ); keep max_rank (nvmlib train: -K) >= 2, or None to "
            "keep all"
        )


def check_deviations(deviations: Any) -> None:
    """deviations is one of DEVIATIONS, or an InputError."""
    if not isinstance(deviations, str) or deviations not in DEVIATIONS:
        raise InputError(
            f"deviations={deviations!r} is not one of {', '.join(DEVIATIONS)} (final centres "
            "D's rows on the mean of all iterates, running each on the mean at its collection, "
            "as swa_gaussian)"
        )


def deviations_of(meta: dict) -> str:
    """What D's rows are centred on (a posterior written before the field: "final")."""
    return meta.get("deviations", "final")


def new_meta(
    n_params: Any,
    max_rank: Any,
    dtype: Any,
    checkpoint_every: Any,
    capacity: Any,
    model: str | None,
    codec: str | None,
    deviations: Any = "final",
) -> dict:
    """The meta of a new posterior, after every argument check (InputError naming the bad one)."""
    check_deviations(deviations)
    if not isinstance(n_params, (int, np.integer)) or isinstance(n_params, bool) or n_params < 1:
        raise InputError(f"n_params must be a positive integer, not {n_params!r}")
    check_max_rank(max_rank)
    for name, value in (("capacity", capacity), ("checkpoint_every", checkpoint_every)):
        _integer(name, value)
    try:
        dtype = str(np.dtype(dtype))
    except TypeError:
        dtype = repr(dtype)
    if dtype not in FLOAT_DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    if max_rank is None and capacity is None:
        raise InputError(
            "max_rank=None keeps every iterate: pass capacity=<number of updates> "
            "so the tier can reserve the log (nvmlib train computes it)"
        )
    cap = int(max_rank if max_rank is not None else capacity)
    if cap < 2:
        raise InputError(f"capacity={cap}: a posterior needs room for at least 2 iterates")
    if checkpoint_every < 1:
        raise InputError(f"checkpoint_every must be >= 1, not {checkpoint_every}")
    check_codec(codec)
    n = int(n_params)
    return {
        "format": FORMAT,
        "n_params": n,
        "max_rank": max_rank,
        "capacity": cap,
        **layout(n, cap, dtype, codec, chunk_for(cap)),
        "moments_len": padded_len(n, "float64", ALIGN),
        "dtype": dtype,
        "model": model,
        "deviations": deviations,
        "checkpoint_every": int(max(1, min(checkpoint_every, cap // 2))),
        "id": new_identity(),
    }


def arrays(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every array of the posterior but its meta."""
    n, m = meta["n_params"], meta["moments_len"]
    return {
        **log_class(meta).arrays(meta),
        COUNT: ((2,), "int64"),
        SHIFT: ((n,), "float64"),
        MOMENTS: ((2, 2, m), "float64"),
        COMMIT: ((2, 6), "int64"),
    }


def check_shapes(store: Store, meta: dict) -> None:
    """Every array has the shape its meta says (a swapped or resized file is refused)."""
    for name, (shape, _) in arrays(meta).items():
        if name not in store:
            raise PosteriorError(f"{store.describe()} lacks {name}: the posterior is damaged")
        if store.shape(name) != shape:
            raise PosteriorError(
                f"{name} on {store.describe()} has shape {store.shape(name)}, "
                f"not {shape} as {META} says: the posterior is damaged"
            )


def check_file_size_limit(store: Store, name: str, nbytes: int) -> None:
    """Refuse, before anything is deleted, a file larger than this process may write (ulimit -f)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if (
        store.path is not None
        and store.path.is_dir()
        and soft != resource.RLIM_INFINITY
        and nbytes + ALIGN > soft
    ):
        raise StoreError(
            f"the posterior's {name} needs a file of {(nbytes + ALIGN) / 1e9:.3f} GB but "
            f"this process may write files of at most {soft / 1e9:.3f} GB (ulimit -f); "
            "raise the limit or keep fewer iterates (smaller max_rank / -K). "
            "Nothing was changed"
        )


def write_meta(store: Store, meta: dict) -> None:
    """Write the meta, last of a create: its presence marks a whole posterior."""
    body = json.dumps(meta).encode()
    raw = np.frombuffer(body + b"\n" + f"{digest(body):016x}".encode(), dtype=np.uint8)
    store.create(META, raw.shape, "uint8")
    store.write_rows(META, 0, raw)
    store.persist(META)


def read_meta(store: Store) -> dict:
    """The verified meta of the posterior on `store`; PosteriorError saying what is wrong."""
    if META not in store:
        raise PosteriorError(
            f"{store.describe()} holds no posterior (no {META}); check the path, "
            "or create one with SWAGPosterior.create / nvmlib train"
        )
    raw = store.read_rows(META, 0, store.shape(META)[0]).tobytes()
    if not raw.strip(b"\0"):
        raise PosteriorError(
            f"{store.describe()} holds an incomplete posterior: its creation was "
            f"interrupted before {META} was written; create it again "
            "(overwrite=True, train: --overwrite)"
        )
    body, _, tail = raw.rpartition(b"\n")
    try:
        old = json.loads(raw)
    except ValueError:
        old = None
    if isinstance(old, dict) and old.get("format") != FORMAT:
        raise PosteriorError(
            f"the posterior on {store.describe()} has format {old.get('format')}, "
            f"written by an older nvmlib; this version reads format {FORMAT} "
            "(checksummed) only: collect it again, or read it with the nvmlib "
            "version that wrote it"
        )
    try:
        meta = json.loads(body)
        ok = isinstance(meta, dict) and int(tail, 16) == digest(body)
    except ValueError:
        ok = False
    if not ok:
        raise PosteriorError(
            f"{META} on {store.describe()} fails its checksum: the posterior's "
            "description was torn by an interrupted create, or damaged or edited "
            "since; it cannot be trusted (restore it from a copy, or create it again "
            "with overwrite=True)"
        )
    if meta.get("format") != FORMAT:
        raise PosteriorError(
            f"posterior format {meta.get('format')} is not {FORMAT}; "
            "it was written by another nvmlib version"
        )
    return meta
