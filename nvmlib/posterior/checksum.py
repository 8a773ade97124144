"""Checksums of a posterior's data: xxHash3-64 (about 13 GB/s on one core here, 8x zlib's crc32),
seeded with the posterior's identity so that a file of another posterior never verifies."""

from __future__ import annotations

import uuid

import numpy as np
import xxhash

MASK = (1 << 63) - 1  # digests are kept as non-negative int64, the type of the posterior's records


def digest(data: np.ndarray | bytes, seed: int = 0) -> int:
    """xxHash3-64 of the bytes of `data` (a contiguous array or bytes), seeded, as an int64 >= 0."""
    buf = data if isinstance(data, bytes) else memoryview(np.ascontiguousarray(data)).cast("B")
    return xxhash.xxh3_64_intdigest(buf, seed) & MASK


class Digest:
    """digest(data, seed) of data given in parts, in order (a row read a block at a time)."""

    def __init__(self, seed: int = 0) -> None:
        self._hash = xxhash.xxh3_64(seed=seed)

    def update(self, part: np.ndarray) -> None:
        self._hash.update(memoryview(np.ascontiguousarray(part)).cast("B"))

    def value(self) -> int:
        return self._hash.intdigest() & MASK


def row_seed(ident: int, t: int) -> int:
    """The seed of iterate t's row: ties the row to its posterior and to its place in the run."""
    return digest(int(t).to_bytes(8, "little", signed=True), ident)


def new_identity() -> str:
    """A random identity for a new posterior (recorded in its meta, folded into every checksum)."""
    return uuid.uuid4().hex


def identity_seed(ident: str) -> int:
    """The int64 seed of identity `ident` (a uuid4 hex string)."""
    return int(ident[:16], 16) & MASK
