"""The tests' one tier table and the contract-test base every tier's tests subclass (in the manner
of zarr-python's `zarr.testing.store.StoreTests`).

`TIERS` names each way the tests open a memory tier (a registered tier, or a layout of one such
as pmem's devdax) and the capabilities it has. A test module writes its tier tests as methods of a
`TierCase` subclass and calls `per_tier` on it: one `Test<Tier>` class per row of `TIERS` lands
in the module (`tests/test_tiers.py::TestPmemDevdax::test_delete`), skipped with the reason where
this machine lacks the tier, and a test that needs a capability asks `self.require(...)`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from nvmlib.backends import Store, available_tiers, open_store
from nvmlib.backends.registry import TIERS as REGISTERED
from nvmlib.errors import LockedError, StoreError

DEVDAX_STANDIN_BYTES = 64 << 20
SHM = Path("/dev/shm") / "nvmlib-test"  # pmem-shm stores, one per test: <session tmp>-<test tmp>
FORCED = os.environ.get("PMEM_IS_PMEM_FORCE") == "1"


@dataclass(frozen=True)
class Tier:
    """How the tests open one tier under a test's directory, and what it can do."""

    name: str  # the test id: a registered tier or a layout of one ("pmem-devdax")
    kind: str  # its tier in nvmlib.backends.registry.TIERS
    opener: Callable[..., Store]  # (directory, **options) -> the store; the same place each call
    persistent: bool = True  # what it holds outlives the store object
    files: bool = False  # each array is a file of its own below the directory, written in place
    tear: int | None = None  # the bytes a torn write keeps or loses together (None: no crash model)
    readonly_mount: bool = False  # it opens read-only on a file system mounted read-only
    in_directory: bool = True  # it lies below the directory it is given
    needs: str = ""  # why it cannot run here ("" : it can)

    def open(self, directory: Path, **options) -> Store:
        """A store of this tier below `directory` (options: readonly=True, ...)."""
        return self.opener(directory, **options)


def _pmem_devdax(tmp: Path, **options) -> Store:
    """pmem's devdax layout on a pre-sized sparse file standing in for /dev/daxN.M."""
    device = tmp / "dax0.0"
    if tmp.is_dir() and not device.exists():
        with device.open("wb") as f:
            f.truncate(DEVDAX_STANDIN_BYTES)
    return open_store("pmem", device, device=True, **options)


def _pmem_shm(tmp: Path, **options) -> Store:
    """pmem on /dev/shm: with PMEM_IS_PMEM_FORCE=1 it takes real hardware's pmem_persist path."""
    return open_store("pmem", SHM / f"{tmp.parent.name}-{tmp.name}", **options)


def _pymm(tmp: Path, **options) -> Store:
    return open_store("pymm", tmp / "pymm", size_mb=64, name=f"t{tmp.name}", **options)


_STATUS = available_tiers()


def _unavailable(kind: str) -> str:
    """Why tier `kind` cannot be used here ("" : it can)."""
    return "" if _STATUS[kind] == "ok" else _STATUS[kind]


# PMEM_IS_PMEM_FORCE is read by libpmem when it is loaded, so it holds for a whole process: a
# plain session runs the pmem tier on its msync path; tests/test_pmem.py reruns the pmem tests in
# a subprocess with PMEM_IS_PMEM_FORCE=1, where pmem-shm runs too.
TIERS: dict[str, Tier] = {
    t.name: t
    for t in [
        Tier("dram", "dram", lambda tmp, **kw: open_store("dram", **kw), persistent=False),
        Tier(
            "mmap",
            "mmap",
            lambda tmp, **kw: open_store("mmap", tmp / "mmap", **kw),
            files=True,
            tear=512,
            readonly_mount=True,
        ),
        # zarr writes log rows (4 KiB) and small records in place: torn 512-byte sectors, as files
        Tier(
            "zarr",
            "zarr",
            lambda tmp, **kw: open_store("zarr", tmp / "posterior.zarr", **kw),
            files=True,
            tear=512,
        ),
        Tier(
            "pmem",
            "pmem",
            lambda tmp, **kw: open_store("pmem", tmp / "pmem", **kw),
            files=True,
            tear=8,
            readonly_mount=True,
            needs=_unavailable("pmem"),
        ),
        Tier(
            "pmem-devdax",
            "pmem",
            _pmem_devdax,
            tear=8,
            readonly_mount=True,
            needs=_unavailable("pmem"),
        ),
        Tier(
            "pmem-shm",
            "pmem",
            _pmem_shm,
            tear=8,
            in_directory=False,
            needs=_unavailable("pmem")
            or (
                ""
                if FORCED and Path("/dev/shm").is_dir()
                else "runs with PMEM_IS_PMEM_FORCE=1 (tests/test_pmem.py)"
            ),
        ),
        Tier("pymm", "pymm", _pymm, needs=_unavailable("pymm")),
    ]
}
AVAILABLE = [name for name, tier in TIERS.items() if not tier.needs]
assert {t.kind for t in TIERS.values()} == set(REGISTERED), "give each registered tier a row"


class TierCase:
    """The base of every per-tier test class: `tier` (set by `per_tier`), a fresh `store`, a
    `reopen` of the same place, and `require` for capability skips."""

    tier: Tier

    @pytest.fixture
    def where(self, tmp_path: Path) -> Path:
        """The directory the tier's store lies in (a subclass may put it elsewhere)."""
        return tmp_path

    @pytest.fixture
    def reopen(self, where: Path) -> Callable[..., Store]:
        """Open (again) the store of this test's place (options: readonly=True)."""
        return lambda **options: self.tier.open(where, **options)

    @pytest.fixture
    def store(self, reopen: Callable[..., Store]) -> Store:
        st = reopen()
        yield st
        st.close()

    def require(self, capability: str, why: str = "") -> None:
        """Skip unless this tier has `capability` (a boolean field of Tier)."""
        if not getattr(self.tier, capability):
            pytest.skip(f"{self.tier.name} lacks {capability!r}" + (f": {why}" if why else ""))


def per_tier(contract: type[TierCase]) -> dict[str, type[TierCase]]:
    """`Test<Tier>` subclasses of `contract`, one per row of TIERS (put them in a test module's
    globals()); a tier this machine lacks is skipped with the reason."""
    classes = {}
    for tier in TIERS.values():
        name = "Test" + "".join(part.capitalize() for part in tier.name.split("-"))
        marks = [pytest.mark.skip(reason=f"{tier.name}: {tier.needs}")] if tier.needs else []
        classes[name] = type(
            name,
            (contract,),
            {"tier": tier, "pytestmark": marks, "__doc__": f"{contract.__doc__} ({tier.name})"},
        )
    return classes


class TierContract(TierCase):
    """The Store contract."""

    def test_create_write_read_round_trip(self, store):
        store.create("x", (6, 4), "float32")
        assert "x" in store and store.names() == ["x"]
        assert store.shape("x") == (6, 4) and store.dtype("x") == np.float32
        assert not store.read_rows("x", 0, 6).any(), "a new array is zero-filled"
        rows = np.arange(8, dtype=np.float32).reshape(2, 4)
        store.write_rows("x", 3, rows)
        store.persist("x")
        np.testing.assert_array_equal(store.read_rows("x", 3, 5), rows)
        out = np.empty((1, 4), np.float32)
        assert store.read_rows("x", 4, 5, out=out) is out
        np.testing.assert_array_equal(out, rows[1:])
        assert store.nbytes("x") == 6 * 4 * 4

    def test_flat_ranges_within_a_row_of_the_last_axis(self, store, reopen):
        store.create("m", (2, 2, 700), "float64")
        store.create("v", (1000,), "float64")
        part = np.arange(300, dtype=np.float64) + 0.5
        store.write_flat("m", 3 * 700 + 100, part)  # slot 1, second sum, elements 100..399
        store.write_flat("m", 5, part[:10])
        store.write_flat("v", 990, part[:10])
        for name in ("m", "v"):
            store.persist(name)
        expected = np.zeros((2, 2, 700))
        expected[1, 1, 100:400], expected[0, 0, 5:15] = part, part[:10]
        np.testing.assert_array_equal(store.read_rows("m", 0, 2), expected)
        np.testing.assert_array_equal(store.read_flat("m", 2200, 2300), part[:100])
        out = np.empty(10)
        assert store.read_flat("v", 990, 1000, out) is out
        np.testing.assert_array_equal(out, part[:10])
        with pytest.raises(StoreError, match="within one row"):
            store.write_flat("m", 650, part[:100])  # across the end of a row
        with pytest.raises(StoreError, match="within one row"):
            store.read_flat("v", 950, 1001)
        if self.tier.persistent:
            store.close()
            again = reopen()
            np.testing.assert_array_equal(again.read_flat("m", 2200, 2500), part)
            again.close()

    @pytest.mark.parametrize("dtype", ["float16", "float64", "int64", "uint8"])
    def test_dtype_and_shape_kept(self, store, dtype):
        store.create("a", (3, 2, 5), dtype)
        data = (np.arange(30) % 7).astype(dtype).reshape(3, 2, 5)
        store.write_rows("a", 0, data)
        back = store.read_rows("a", 0, 3)
        assert back.dtype == np.dtype(dtype) and back.shape == (3, 2, 5)
        np.testing.assert_array_equal(back, data)

    def test_array_is_usable_in_place(self, store):
        store.create("v", (5,), "float64")
        store.array("v")[2] = 7.5
        store.persist("v")
        assert store.read_rows("v", 0, 5).tolist() == [0, 0, 7.5, 0, 0]

    def test_delete(self, store):
        store.create("a", (4,), "int64")
        store.create("b", (4,), "int64")
        store.delete("a")
        assert store.names() == ["b"] and "a" not in store
        store.create("a", (2,), "uint8")  # the name (and the space) can be used again
        assert store.shape("a") == (2,)

    def test_duplicate_create_refused(self, store):
        store.create("x", (2,), "float32")
        with pytest.raises(StoreError, match="already exists"):
            store.create("x", (2,), "float32")

    def test_missing_array_is_a_clear_error(self, store):
        with pytest.raises(StoreError, match="no array 'nope'"):
            store.read_rows("nope", 0, 1)

    def test_too_small_store_refused_before_writing(self, store):
        free = store.free_bytes()
        if free is None:
            pytest.skip(f"{store.describe()} does not know its free space")
        # twice what was free: other processes may free some meanwhile
        with pytest.raises(StoreError, match="too small"):
            store.create("huge", (2 * free + (1 << 30),), "uint8")
        assert "huge" not in store

    def test_second_writer_refused(self, store, reopen):
        store.lock("log")
        second = reopen() if self.tier.persistent else store
        with pytest.raises(LockedError, match="written by|already"):
            second.lock("log")
        store.unlock("log")
        second.lock("log")  # free again once the first writer lets go
        second.unlock("log")

    def test_reopen_sees_the_data(self, reopen):
        self.require("persistent")
        first = reopen()
        first.create("x", (3, 2), "float64")
        first.write_rows("x", 1, np.array([[1.5, -2.0]]))
        first.persist("x")
        first.close()
        again = reopen()
        assert again.names() == ["x"] and again.shape("x") == (3, 2)
        assert again.dtype("x") == np.float64
        np.testing.assert_array_equal(again.read_rows("x", 0, 3), [[0, 0], [1.5, -2.0], [0, 0]])
        again.close()

    def test_readonly_store_refuses_writes(self, reopen):
        self.require("persistent")
        writer = reopen()
        writer.create("x", (2,), "int64")
        writer.close()
        reader = reopen(readonly=True)
        for write in (
            lambda: reader.create("y", (1,), "int64"),
            lambda: reader.write_rows("x", 0, np.array([1])),
        ):
            with pytest.raises(StoreError, match="read-only"):
                write()
        with pytest.raises(ValueError):
            reader.array("x")[0] = 1
        assert reader.read_rows("x", 0, 2).tolist() == [0, 0]
        reader.close()

    def test_unwritable_path_is_a_clear_error(self, tmp_path):
        self.require("persistent")
        self.require("in_directory", "the pmem tier runs this check")
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        with pytest.raises(StoreError, match=str(blocker)):
            self.tier.open(blocker)

    def test_lock_files_never_follow_links(self, store, tmp_path):
        """A symlink planted where a lock file goes is refused, and its target is left untouched."""
        self.require("persistent", "the dram tier has no lock file")
        target = tmp_path / "victim"
        target.write_text("precious")
        lock = store._lock_path("log")
        lock.unlink(missing_ok=True)
        lock.symlink_to(target)
        with pytest.raises(StoreError, match="symbolic link"):
            store.lock("log")
        assert target.read_text() == "precious"
        lock.unlink()
        store.lock("log")  # a plain lock file works
        store.unlock("log")
