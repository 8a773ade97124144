"""Lossless delta codecs for consecutive iterates: XOR with the previous row, byte grouping,
zstd/lz4.

Consecutive SGD iterates share signs, exponents and high mantissa bits, so θ_t XOR θ_{t−1} is
mostly zero bytes. The XOR-ed row is cut into segments; each segment's bytes are grouped into
planes (byte 0 of every value, then byte 1, …: ZipNN's byte grouping) and each plane is compressed
on its own. Segments are independent, so they are encoded and decoded on a pool of threads (numpy's
kernels and the compressors release the GIL). A keyframe (prev=None) is the row itself, grouped
and compressed the same way. A plane that does not shrink is stored as is, so an encoded row is
never larger than DeltaCodec.bound.

Encoded row: int64 [n_frames, length of each frame (negative: stored raw)], then the frames.
Threads: every core, or NVMLIB_CODEC_THREADS (a whole number >= 1).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba
import numpy as np

from nvmlib.errors import InputError

CODECS = ("delta-zstd", "delta-lz4")
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # the values' bits, as words of their width
SEGMENT_BYTES = (
    1 << 20
)  # bytes of the row per task: small enough to spread, big enough to compress well


@numba.njit(nogil=True, cache=True)
def _group(cur: np.ndarray, prev: np.ndarray, delta: bool, planes: np.ndarray) -> None:
    """planes[k, i] = byte k of value i of cur (XOR prev when delta); cur, prev: unsigned
    integers of 2, 4 or 8 bytes. One pass, no GIL (the branches on the width are hoisted)."""
    width = planes.shape[0]
    for i in range(cur.shape[0]):
        x = cur[i] ^ prev[i] if delta else cur[i]
        planes[0, i] = x & 0xFF
        planes[1, i] = (x >> 8) & 0xFF
        if width > 2:
            planes[2, i] = (x >> 16) & 0xFF
            planes[3, i] = (x >> 24) & 0xFF
        if width > 4:
            planes[4, i] = (x >> 32) & 0xFF
            planes[5, i] = (x >> 40) & 0xFF
            planes[6, i] = (x >> 48) & 0xFF
            planes[7, i] = (x >> 56) & 0xFF


@numba.njit(nogil=True, cache=True)
def _ungroup(planes: np.ndarray, prev: np.ndarray, delta: bool, out: np.ndarray) -> None:
    """The inverse of _group: out's values from the planes (XOR prev when delta)."""
    width, word = planes.shape[0], out.dtype.type
    for i in range(out.shape[0]):
        x = word(planes[0, i]) | (word(planes[1, i]) << 8)
        if width > 2:
            x |= (word(planes[2, i]) << 16) | (word(planes[3, i]) << 24)
        if width > 4:
            x |= (
                (word(planes[4, i]) << 32)
                | (word(planes[5, i]) << 40)
                | (word(planes[6, i]) << 48)
                | (word(planes[7, i]) << 56)
            )
        out[i] = x ^ prev[i] if delta else x


def check_codec(codec: str | None) -> None:
    """Refuse a codec name this version does not know, one whose compressor is not installed, or a
    bad NVMLIB_CODEC_THREADS."""
    if codec is None:
        return
    if codec not in CODECS:
        raise InputError(f"codec {codec!r} is not one of None (raw rows), {', '.join(CODECS)}")
    _compressors(codec)
    codec_threads()


def codec_threads() -> int:
    """Threads a codec encodes and decodes on: NVMLIB_CODEC_THREADS (a whole number >= 1), else
    every core."""
    text = os.environ.get("NVMLIB_CODEC_THREADS", "").strip()
    if not text:
        return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise InputError(
            f"NVMLIB_CODEC_THREADS={text!r}: set it to a whole number of threads >= 1 "
            "(e.g. NVMLIB_CODEC_THREADS=4), or unset it to use every core"
        )
    return int(text)


def _compressors(codec: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]:
    """(compress, decompress(data, size)) of the codec's back end (level 1: the fastest); zstd's
    contexts are made once per thread (making one costs more than compressing a plane)."""
    try:
        if codec == "delta-zstd":
            import zstandard

            local = threading.local()

            def contexts() -> threading.local:
                if not hasattr(local, "c"):
                    local.c, local.d = (
                        zstandard.ZstdCompressor(level=1),
                        zstandard.ZstdDecompressor(),
                    )
                return local

            return (
                lambda b: contexts().c.compress(b),
                lambda b, n: contexts().d.decompress(b, max_output_size=n),
            )
        import lz4.block

        return (
            lambda b: lz4.block.compress(b, store_size=False),
            lambda b, n: lz4.block.decompress(b, uncompressed_size=n),
        )
    except ImportError as exc:
        raise InputError(
            f"codec {codec!r} needs the Python package {exc.name!r}: pip install {exc.name}"
        ) from None


class DeltaCodec:
    """Encode/decode rows of n values of `dtype` as XOR-deltas (or keyframes) on `threads`
    threads."""

    def __init__(self, codec: str, dtype: np.dtype, n: int, threads: int | None = None) -> None:
        check_codec(codec)
        self.codec, self.n = codec, n
        self.width = np.dtype(dtype).itemsize
        self.uint = np.dtype(UINT[self.width])
        step = max(1, SEGMENT_BYTES // self.width)
        self.segments = [(a, min(a + step, n)) for a in range(0, n, step)]
        self.n_frames = len(self.segments) * self.width
        self._compress, self._decompress = _compressors(codec)
        self._pool = ThreadPoolExecutor(
            threads or codec_threads(), thread_name_prefix="nvmlib-codec"
        )

    @staticmethod
    def bound(dtype: np.dtype, n: int) -> int:
        """Bytes of the largest encoded row of n values: the table and every plane stored raw."""
        width = np.dtype(dtype).itemsize
        segments = -(-n // max(1, SEGMENT_BYTES // width))
        return 8 * (1 + segments * width) + n * width

    def encode(self, row: np.ndarray, prev: np.ndarray | None) -> list[bytes | memoryview]:
        """The encoded row as a list of byte strings (table first), to be written one after
        another."""
        cur = row.view(self.uint)
        old = cur if prev is None else prev.view(self.uint)

        def segment(span: tuple[int, int]) -> list[bytes | memoryview]:
            a, b = span
            planes = np.empty((self.width, b - a), np.uint8)
            _group(cur[a:b], old[a:b], prev is not None, planes)
            out: list[bytes | memoryview] = []
            for plane in planes:
                packed = self._compress(plane.data)
                out.append(packed if len(packed) < plane.nbytes else plane.data)
            return out

        frames = [f for seg in self._pool.map(segment, self.segments) for f in seg]
        table = np.array(
            [len(frames)] + [len(f) if isinstance(f, bytes) else -len(f) for f in frames], np.int64
        )
        return [table.tobytes(), *frames]

    def decode(self, data: memoryview, prev: np.ndarray | None, out: np.ndarray) -> None:
        """Decode one encoded row into `out` (n values); prev: the row before it (None: a keyframe).
        ValueError when `data` is not a row this codec wrote (a damaged record)."""
        if len(data) < 8 or int(np.frombuffer(data[:8], np.int64)[0]) != self.n_frames:
            raise ValueError("the record's frame table does not match this log's layout")
        table = np.frombuffer(data[8 : 8 * (1 + self.n_frames)], np.int64)
        ends = np.cumsum(np.abs(table)) + 8 * (1 + self.n_frames)
        if len(table) != self.n_frames or ends[-1] > len(data):
            raise ValueError("the record is shorter than its frame table says")
        starts = ends - np.abs(table)
        dst = out.view(self.uint)
        old = dst if prev is None else prev.view(self.uint)

        def segment(i: int) -> None:
            a, b = self.segments[i]
            planes = np.empty((self.width, b - a), np.uint8)
            for k in range(self.width):
                j = i * self.width + k
                frame = data[starts[j] : ends[j]]
                planes[k] = np.frombuffer(
                    frame if table[j] < 0 else self._decompress(frame, b - a), np.uint8
                )
            _ungroup(planes, old[a:b], prev is not None, dst[a:b])

        try:
            list(self._pool.map(segment, range(len(self.segments))))
        except Exception as exc:  # the compressor's own error, or a frame of the wrong size
            raise ValueError(
                f"a frame of the record does not decode ({type(exc).__name__}: {exc})"
            ) from None

    def close(self) -> None:
        self._pool.shutdown()
