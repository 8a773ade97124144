"""A hostile user on every tier and both log formats: a refused call changes no byte on disk and no
value in memory; links are never written through; a full disk is a StoreError that counts
nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from conftest import small_tmpfs
from contract import TierCase, per_tier

from nvmlib import SWAGPosterior, open_store
from nvmlib.errors import InputError, LockedError, PosteriorError, StoreError
from nvmlib.posterior.log import LOG

CODECS = [None, "delta-zstd"]
N = 96


def _thetas(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, N)) * 0.1 + np.arange(n)[:, None]).astype(np.float32)


def _digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below `root` (lock files hold a pid and are left out)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _live(post: SWAGPosterior) -> tuple:
    return (
        post.n_collected,
        post.mean().tobytes(),
        post.variance().tobytes(),
        post.kept_rows().tobytes(),
    )


@pytest.mark.parametrize("codec", CODECS)
def test_a_closed_posterior_says_closed(codec, tmp_path):
    store = open_store("mmap", tmp_path / "p")
    post = SWAGPosterior.create(store, N, max_rank=4, codec=codec)
    for theta in _thetas(6):
        post.update(theta)
    post.close()
    for read in (post.mean, post.variance, post.kept_rows, lambda: post.sample(2)):
        with pytest.raises(PosteriorError, match="closed; reopen it"):
            read()


def _owned_files(tier: str, root: Path) -> list[Path]:
    if tier == "zarr":
        return [
            p
            for p in root.rglob("*")
            if p.is_file() and p.name != "zarr.json" and ".lock" not in p.name
        ]
    return [p for p in root.glob("*.npy")]


def _fill(path: Path) -> Path:
    """Take every free byte of the file system of `path` with one file; return it."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = b"\1" * (1 << 16)
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\1")
    return filler


class HostileContract(TierCase):
    """A hostile user on a tier: refused calls change nothing; no link written through; a full
    disk."""

    @pytest.mark.parametrize("codec", CODECS)
    def test_refused_calls_change_no_byte_and_no_value(self, codec, tmp_path):
        store = self.tier.open(tmp_path)
        post = SWAGPosterior.create(store, N, max_rank=4, checkpoint_every=2, codec=codec)
        for theta in _thetas(20):
            post.update(theta)
        post.flush()
        files, live = _digest_tree(tmp_path), _live(post)
        bad_theta = _thetas(1)[0].copy()
        bad_theta[3] = np.nan
        refusals = [
            (
                lambda: post.truncate(3),
                PosteriorError,
                "Nothing was changed",
            ),  # the ring has dropped what 3 needs
            (lambda: post.truncate(-1), InputError, "cannot truncate"),
            (lambda: post.truncate(25), InputError, "cannot truncate"),
            (lambda: post.truncate(2.5), InputError, "whole number"),
            (lambda: post.update(bad_theta), InputError, "NaN"),
            (lambda: post.update(np.zeros(N + 1, np.float32)), ValueError, "shape"),
            (lambda: post.update(np.zeros(N, np.int32)), TypeError, "floating point"),
            (lambda: post.sample(2, scale=float("nan")), ValueError, "scale"),
            (
                lambda: SWAGPosterior.create(store, N, max_rank=4, overwrite=True),
                LockedError,
                "writer",
            ),
            (lambda: SWAGPosterior.open(store), LockedError, "writer"),
        ]
        if self.tier.persistent:  # a second store object on the same path, in this process
            refusals.append(
                (
                    lambda: SWAGPosterior.open(self.tier.open(tmp_path)),
                    LockedError,
                    "already has a writer in this process|already open in this process",
                )
            )
        for call, error, message in refusals:
            with pytest.raises(error, match=message):
                call()
            assert _digest_tree(tmp_path) == files, f"{message}: files changed"
            assert _live(post) == live, f"{message}: the live posterior changed"
        post.close()
        again = SWAGPosterior.open(store, readonly=True)
        assert _live(again) == live
        again.close()
        store.close()

    def test_overwrite_refused_by_the_file_size_limit_keeps_the_old_posterior(self, tmp_path):
        """With a small max_rank the moments (32 bytes a parameter) are the largest file: it is
        checked too."""
        self.require("files")
        store = self.tier.open(tmp_path)
        old = SWAGPosterior.create(store, N, max_rank=4)
        for theta in _thetas(5):
            old.update(theta)
        old.close()
        files = _digest_tree(tmp_path)
        n_params = 60_000  # log ≈ 0.7 MB, moments ≈ 1.9 MB
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        try:
            with pytest.raises(StoreError, match="swag.moments.*ulimit -f.*Nothing was changed"):
                SWAGPosterior.create(store, n_params, max_rank=2, overwrite=True)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert _digest_tree(tmp_path) == files
        assert SWAGPosterior.open(store, readonly=True).n_collected == 5

    @pytest.mark.parametrize("how", ["symlink", "hardlink"])
    def test_no_file_of_a_posterior_is_written_through_a_link(self, how, tmp_path):
        """Each file the writer owns, replaced by a link to a file outside: opening for writing is
        refused and the outside file keeps every byte (a hard link is refused where the tier writes
        in place)."""
        self.require("files")
        if self.tier.kind == "zarr" and how == "hardlink":
            pytest.skip(
                "zarr replaces its objects by rename (a hard link is not written through); "
                "the open shard file itself is hard-linked into the log by design"
            )
        root = tmp_path / ("posterior.zarr" if self.tier.kind == "zarr" else self.tier.name)
        store = self.tier.open(tmp_path)
        post = SWAGPosterior.create(store, N, max_rank=4, checkpoint_every=2)
        for theta in _thetas(5):
            post.update(theta)
        post.close()
        store.close()
        owned = _owned_files(self.tier.kind, root)
        assert {p.name for p in owned} >= (
            {"swag.log.npy", "swag.count.npy", "swag.moments.npy"}
            if self.tier.kind != "zarr"
            else {"0"}
        )
        for file in owned:
            outside = tmp_path / "outside"
            os.replace(file, outside)
            if how == "symlink":
                file.symlink_to(outside)
            else:
                os.link(outside, file)
            before = outside.read_bytes()
            with pytest.raises(StoreError, match="symbolic link|hard link"):
                st = self.tier.open(tmp_path)
                try:
                    writer = SWAGPosterior.open(st)
                    for theta in _thetas(6, seed=1):
                        writer.update(theta)
                    writer.close()
                finally:
                    st.close()
            assert outside.read_bytes() == before, f"{file.name} was written through a {how}"
            file.unlink()
            os.replace(outside, file)

    @pytest.mark.parametrize("codec", CODECS)
    def test_a_full_disk_is_a_store_error_that_counts_nothing(self, codec, tmp_path):
        self.require("files")
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        n_params = 40_000
        thetas = (np.random.default_rng(3).standard_normal((30, n_params)) * 0.1).astype(np.float32)
        with small_tmpfs(tmp_path / "fs", 24) as fs:
            store = self.tier.open(fs)
            post = SWAGPosterior.create(
                store, n_params, max_rank=8, checkpoint_every=4, codec=codec
            )
            kept: list[np.ndarray] = []
            for theta in thetas[:5]:
                post.update(theta)
                kept.append(theta)
            post.flush()
            filler = _fill(fs)
            refused = 0
            for theta in thetas[5:25]:
                try:
                    post.update(theta)
                    _ = post.n_collected  # the row is written behind the call: this waits for it
                except StoreError as exc:
                    assert post.n_collected == len(kept), "a refused update was counted"
                    assert "free space" in str(exc) and str(fs) in str(exc), exc
                    refused += 1
                    print(f"refused at {len(kept)}: {exc}")
                    filler.unlink()  # free space, then record the same iterate again
                    post.update(theta)
                    _ = post.n_collected  # waits for the row
                    filler = _fill(fs)
                kept.append(theta)
                assert post.n_collected == len(kept)
            try:
                post.close()
            except StoreError as exc:  # a close on a full disk says so, in the tier's terms
                assert "free space" in str(exc)
                filler.unlink()
                post.close()
            filler.unlink(missing_ok=True)
            grows = store.grows
            store.close()
            # raw rows take no new space; zarr's shards and a compressed log's records (where the
            # tier grows) do, as they are written
            assert (refused > 0) == (self.tier.kind == "zarr" or (codec is not None and grows)), (
                refused
            )
            again = SWAGPosterior.open(self.tier.open(fs), readonly=True)
            ref = np.asarray(kept, np.float64)
            assert again.n_collected == len(kept)
            np.testing.assert_allclose(again.mean(), ref.mean(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(again.kept_rows(), ref[-8:].astype(np.float32))
            again.close()
            again.store.close()

    @contextlib.contextmanager
    def _growing_store(self, tmp_path: Path) -> Iterator[tuple[Path, Any]]:
        """(a 24 MB tmpfs: a real full disk, a store of this tier on it) where the tier's arrays
        take space as they are written; the test is skipped elsewhere."""
        self.require("files")
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        with small_tmpfs(tmp_path / "fs", 24) as fs:
            store = self.tier.open(fs)
            if not store.grows:
                store.close()
                pytest.skip(f"the {self.tier.kind} tier takes every array's whole size at create")
            yield fs, store

    def test_a_row_refused_behind_its_checkpoint_is_its_own_error_and_counts_nothing(
        self, tmp_path
    ):
        """An update that checkpoints returns before its row is written; when the disk refuses
        that row, the next call says the iterate was not recorded (not that a checkpoint failed),
        the moments leave it out, and recording it again gives the uninterrupted posterior."""
        n_params = 40_000
        thetas = (np.random.default_rng(4).standard_normal((14, n_params))).astype(np.float32)
        with self._growing_store(tmp_path) as (fs, store):
            post = SWAGPosterior.create(
                store, n_params, max_rank=8, checkpoint_every=4, codec="delta-zstd"
            )
            for theta in thetas[:5]:
                post.update(theta)
            post.flush()  # a checkpoint of 5: the 9th update takes the next one
            for theta in thetas[5:8]:
                assert not post.update(theta)
            assert post.n_collected == 8
            filler = _fill(fs)
            assert post.update(thetas[8]), "the 9th update takes a checkpoint"
            with pytest.raises(StoreError, match="was not recorded") as refused:
                _ = post.n_collected  # waits for the row
            assert "free space" in str(refused.value) and "checkpoint" not in str(refused.value)
            assert post.n_collected == 8
            ref = thetas[:8].astype(np.float64)
            np.testing.assert_allclose(post.mean(), ref.mean(0), rtol=1e-9, atol=1e-9)
            filler.unlink()
            for theta in thetas[8:]:
                post.update(theta)
            post.close()
            store.close()
            again = SWAGPosterior.open(self.tier.open(fs), readonly=True)
            ref = thetas.astype(np.float64)
            assert again.n_collected == len(thetas)
            np.testing.assert_allclose(again.mean(), ref.mean(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(again.variance(), ref.var(0), rtol=1e-6, atol=1e-9)
            assert again.kept_rows().tobytes() == thetas[-8:].tobytes()
            again.close()
            again.store.close()

    @pytest.mark.parametrize("max_rank", [6, None])
    def test_a_compressed_log_grows_until_the_disk_is_full_and_loses_nothing(
        self, max_rank, tmp_path
    ):
        """A compressed log takes space record by record: on a disk that fills up, the record that
        does not fit is refused with a StoreError (n_collected unchanged), and a reopen after the
        writer is gone without a close holds exactly the iterates counted before it; a ring, which
        occupies its kept chunks, goes on in the room it has."""
        n_params, T = 50_000, 80
        rng = np.random.default_rng(5)
        steps = [rng.standard_normal(n_params)] + [rng.standard_normal((T - 1, n_params)) * 1e-4]
        thetas = np.cumsum(np.vstack(steps), 0).astype(np.float32)  # about 2x compressible
        with self._growing_store(tmp_path) as (fs, store):
            post = SWAGPosterior.create(
                store,
                n_params,
                max_rank=max_rank,
                capacity=T,
                checkpoint_every=3,
                codec="delta-zstd",
            )
            assert store.occupied(LOG) < store.nbytes(LOG) / 100, (
                "the log reserved room for its records"
            )
            for theta in thetas[:4]:
                post.update(theta)
            post.flush()
            room = 3 << 20  # what the filler leaves: room for ~30 records, not T
            with open(fs / "filler", "wb") as f:
                f.truncate(shutil.disk_usage(fs).free - room)
                os.posix_fallocate(f.fileno(), 0, f.seek(0, 2))
            kept, why = 4, None
            for theta in thetas[4:]:
                try:
                    post.update(theta)
                    _ = post.n_collected  # the record is written behind the call: this waits for it
                except StoreError as exc:
                    why = exc
                    break
                kept += 1
            if max_rank is not None:
                assert why is None and kept == T, why
                assert post.kept_rows().tobytes() == thetas[-max_rank:].tobytes()
                post.close()
                return
            assert why is not None and "free space" in str(why) and str(fs) in str(why), why
            assert post.n_collected == kept and 10 < kept < T, kept
            assert post.kept_rows().tobytes() == thetas[:kept].tobytes()
            store.unlock(LOG)  # the writer is gone without a close: reopen from what is on the disk
            ref = thetas[:kept].astype(np.float64)
            again = SWAGPosterior.open(self.tier.open(fs), readonly=True)
            assert again.n_collected == kept
            np.testing.assert_allclose(again.mean(), ref.mean(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(again.variance(), ref.var(0), rtol=1e-6, atol=1e-9)
            assert again.kept_rows().tobytes() == thetas[:kept].tobytes()
            again.close()

    def test_create_on_a_full_disk_keeps_the_old_posterior(self, tmp_path):
        self.require("files")
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        with small_tmpfs(tmp_path / "fs", 16) as fs:
            store = self.tier.open(fs)
            old = SWAGPosterior.create(store, N, max_rank=4)
            for theta in _thetas(5):
                old.update(theta)
            old.close()
            files = _digest_tree(fs)
            with pytest.raises(StoreError, match="too small|free space"):
                SWAGPosterior.create(store, 200_000, max_rank=40, overwrite=True)
            assert _digest_tree(fs) == files
            assert SWAGPosterior.open(store, readonly=True).n_collected == 5
            store.close()


globals().update(per_tier(HostileContract))
