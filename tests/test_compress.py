"""The compressed delta log (codec="delta-zstd"/"delta-lz4"): lossless on every tier and dtype,
the same posterior as raw rows, checksummed records, readers, truncate and reopen."""

from __future__ import annotations

import numpy as np
import pytest
from contract import TIERS

from nvmlib.errors import InputError, PosteriorError, StoreError
from nvmlib.posterior import SWAGPosterior
from nvmlib.posterior.codec import DeltaCodec
from nvmlib.posterior.log import ASSUMED_RATIO, BLOCK, INDEX, LOG

N, K, T = 3000, 6, 23  # a ring of 6 kept iterates (chunks of 2) that wraps several times


def walk(dtype: str, t: int = T, n: int = N, seed: int = 0) -> np.ndarray:
    """SGD-like iterates: a random walk with small steps, with the dtype's edge values planted."""
    rng = np.random.default_rng(seed)
    rows = np.cumsum(rng.standard_normal((t, n)) * 1e-3, axis=0) + rng.standard_normal(n)
    rows = rows.astype(dtype)
    info = np.finfo(dtype)
    edges = np.array(
        [
            0.0,
            -0.0,
            info.tiny,
            -info.tiny,
            info.smallest_subnormal,
            -info.smallest_subnormal,
            info.max,
            -info.max,
            info.eps,
        ],
        dtype,
    )
    rows[:, : len(edges)] = edges
    rows[1::2, :2] = rows[1::2, 1::-1]  # +0 and −0 swap places: only their sign bits differ
    return rows


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("codec", ["delta-zstd", "delta-lz4"])
def test_every_kept_row_reads_back_bit_exact(store, dtype, codec):
    rows = walk(dtype)
    with SWAGPosterior.create(
        store, N, max_rank=K, dtype=dtype, codec=codec, checkpoint_every=3
    ) as post:
        for t, row in enumerate(rows):
            post.update(row)
            if t in (0, 1, K - 1, K, T - 1):
                got = post.kept_rows()
                assert got.tobytes() == rows[max(0, t + 1 - K) : t + 1].tobytes(), (
                    f"after update {t}"
                )
        assert post.log.chunk == 2 and post.n_collected > post.log.slots  # the ring wrapped
        assert post.iterates(T - 3, T - 1).tobytes() == rows[T - 3 : T - 1].tobytes()
    if store.persistent:
        with SWAGPosterior.open(store, readonly=True) as again:
            assert again.kept_rows().tobytes() == rows[-K:].tobytes()


@pytest.mark.parametrize("max_rank", [K, None])
def test_same_posterior_as_raw_rows(tmp_path, max_rank):
    rows = walk("float32")
    opts = dict(max_rank=max_rank, capacity=None if max_rank else T, checkpoint_every=4)
    raw = SWAGPosterior.create(TIERS["mmap"].open(tmp_path / "raw"), N, **opts)
    packed = SWAGPosterior.create(
        TIERS["mmap"].open(tmp_path / "packed"), N, codec="delta-zstd", **opts
    )
    for row in rows:
        raw.update(row)
        packed.update(row)
    np.testing.assert_array_equal(packed.mean(), raw.mean())
    np.testing.assert_array_equal(packed.variance(), raw.variance())
    np.testing.assert_allclose(packed.sample(7, seed=5), raw.sample(7, seed=5), rtol=0, atol=1e-6)
    logs = [
        post.log.stored_bytes(post.n_collected - post.rank, post.n_collected)
        for post in (raw, packed)
    ]
    assert logs[1] < logs[0], (
        logs
    )  # fewer bytes, although half the records are keyframes (bench_compress: ratios)
    raw.close()
    packed.close()


def test_reopen_after_an_unclean_stop_replays_and_goes_on(tmp_path):
    rows = walk("float32", t=30)
    store = TIERS["mmap"].open(tmp_path)
    post = SWAGPosterior.create(store, N, max_rank=10, codec="delta-zstd", checkpoint_every=4)
    for row in rows[:13]:
        post.update(row)
    post._settle()
    post._fold()  # a dead process's threads stop: its last batch and checkpoint land
    post._journal.wait()
    store.unlock(LOG)  # the process dies: no close, no checkpoint after update 12
    again = SWAGPosterior.open(TIERS["mmap"].open(tmp_path))
    assert again.n_collected == 13
    for row in rows[13:]:  # the next row is a delta of iterate 12, decoded again from its keyframe
        again.update(row)
    assert again.kept_rows().tobytes() == rows[-10:].tobytes()
    np.testing.assert_allclose(
        again.mean(), rows.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12
    )
    again.truncate(25)
    for row in rows[25:]:
        again.update(row)
    assert again.kept_rows().tobytes() == rows[-10:].tobytes()
    again.close()


def test_a_damaged_record_is_refused_with_its_iterate(tmp_path):
    rows = walk("float32")
    store = TIERS["mmap"].open(tmp_path)
    with SWAGPosterior.create(store, N, max_rank=K, codec="delta-zstd") as post:
        for row in rows:
            post.update(row)
        t = T - 3
        entry = store.read_rows(INDEX, t % post.log.slots, t % post.log.slots + 1)[0]
        block = store.read_rows(
            LOG, int(entry[1]) % post.log.blocks, int(entry[1]) % post.log.blocks + 1
        )
        block[0, 100] ^= 1
        store.write_rows(LOG, int(entry[1]) % post.log.blocks, block)
        with pytest.raises(PosteriorError, match=f"record of iterate {t} .* fails its checksum"):
            post.kept_rows()
        entry[2] += BLOCK  # an index row edited to point past its record
        store.write_rows(INDEX, t % post.log.slots, entry[None])
        with pytest.raises(
            PosteriorError, match=f"record of iterate {t} in {INDEX} .* fails its checksum"
        ):
            post.sample(2)


def test_codec_output_is_never_larger_than_its_bound():
    noise = np.random.default_rng(1).integers(0, 2**32, 300_000, dtype=np.uint32).view(np.float32)
    codec = DeltaCodec("delta-zstd", np.dtype(np.float32), len(noise))
    encoded = b"".join(bytes(part) for part in codec.encode(noise, noise[::-1].copy()))
    assert len(encoded) <= DeltaCodec.bound(np.float32, len(noise))
    out = np.empty_like(noise)
    codec.decode(memoryview(encoded), noise[::-1].copy(), out)
    assert out.tobytes() == noise.tobytes()
    with pytest.raises(ValueError, match="frame table"):
        codec.decode(memoryview(encoded[8:]), None, out)
    codec.close()


def test_unknown_codec_is_refused_before_anything_is_written(tmp_path):
    store = TIERS["mmap"].open(tmp_path)
    with pytest.raises(InputError, match="codec 'gzip' is not one of"):
        SWAGPosterior.create(store, N, max_rank=K, codec="gzip")
    assert store.names() == []


@pytest.mark.parametrize("threads", ["abc", "-2", "0", "1.5"])
def test_a_bad_thread_count_is_refused_before_anything_is_written(tmp_path, monkeypatch, threads):
    monkeypatch.setenv("NVMLIB_CODEC_THREADS", threads)
    store = TIERS["mmap"].open(tmp_path)
    with pytest.raises(
        InputError, match=f"NVMLIB_CODEC_THREADS='{threads}': set it to a whole number"
    ):
        SWAGPosterior.create(store, N, max_rank=K, codec="delta-zstd")
    assert store.names() == []
    monkeypatch.setenv("NVMLIB_CODEC_THREADS", "2")
    post = SWAGPosterior.create(store, N, max_rank=K, codec="delta-zstd")
    assert post.log.codec._pool._max_workers == 2
    post.close()


@pytest.mark.parametrize("max_rank", [K, None])
def test_the_log_occupies_the_records_it_keeps(store, max_rank):
    """Where the tier grows, the compressed log's blocks are those of its records (a ring: its kept
    chunks, the dropped ones handed back), not the worst case; elsewhere the worst case, whole."""
    n, t = 20_000, 40
    rows = walk("float32", t, n)
    post = SWAGPosterior.create(
        store, n, max_rank=max_rank, capacity=t, codec="delta-zstd", checkpoint_every=3
    )
    for row in rows:
        post.update(row)
    post.flush()
    index = post.log._index(0, post.log.slots)
    blocks = {int(r[0]): -(-int(r[2]) // BLOCK) * BLOCK for r in index if post.log._valid(r)}
    kept = sum(b for i, b in blocks.items() if i >= t - (max_rank or t))
    live = sum(b for i, b in blocks.items() if i >= t - (max_rank or t) - post.log.chunk)
    if not store.grows:
        assert store.occupied(LOG) >= store.nbytes(LOG)
    else:
        assert kept <= store.occupied(LOG) <= live + (64 << 10), (kept, store.occupied(LOG), live)
        assert store.occupied(LOG) < store.nbytes(LOG) * 0.8
    assert post.kept_rows().tobytes() == rows[-(max_rank or t) :].tobytes()
    assert post.nbytes == post.stored_bytes >= store.occupied(LOG) + store.occupied(INDEX)
    post.close()


def test_the_room_check_assumes_a_ratio_where_the_tier_grows(tmp_path):
    """The room a compressed log is checked for: records at ASSUMED_RATIO of raw rows where the tier
    grows (each record is checked again as it is written), the worst case where it does not."""
    n, rows, chunk = 2_797_010, 600, 32
    raw = SWAGPosterior.required_bytes(n, rows)
    worst = SWAGPosterior.required_bytes(n, rows, codec="delta-zstd")
    grows = SWAGPosterior.required_bytes(n, rows, codec="delta-zstd", grows=True)
    assert grows < raw < worst
    row = -(-n * 4 // BLOCK) * BLOCK
    assert abs(grows - (raw - (rows + 1) * row + (rows + chunk) * row / ASSUMED_RATIO)) < 1e6
    store = TIERS["mmap"].open(tmp_path)
    free = store.free_bytes()
    too_many = int(free * ASSUMED_RATIO / (n * 4)) + 100
    with pytest.raises(StoreError, match=f"at {ASSUMED_RATIO}x less than raw rows"):
        SWAGPosterior.create(store, n, capacity=too_many, codec="delta-zstd")
    assert not list(tmp_path.rglob("*.npy")), "a refused create left files"
