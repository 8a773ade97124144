"""pymm tier: names, size accounting and detection (always), and, where IBM PyMM imports, what
the real library does to a caller: its stdout banner, fixed load addresses, one open per process,
its process-wide POSIX lock and aborts, mapstore's volatility, readers and resume across processes.

The Store contract (tests/test_tiers.py, test_swag.py) and the crash tests (test_crash.py) run on
the pymm tier too wherever IBM PyMM imports (contract.TIERS). Tests that need PyMM skip,
with the reason, where it does not import; the "PyMM" section of docs/tiers.md says how to build it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nvmlib.backends import available_tiers, open_store
from nvmlib.backends.pymm import (
    ITEM_OVERHEAD,
    LARGE_ITEM,
    SHELF_RESERVE,
    _module,
    default_name,
    footprint,
    in_child,
    mangle,
    recorded_ranges,
    shelf_free_bytes,
    unmangle,
)
from nvmlib.errors import LockedError, StoreError, TierUnavailable
from nvmlib.paper.models import get_flat
from nvmlib.paper.train import TrainConfig, train
from nvmlib.posterior.layout import COMMIT, COUNT, META, MOMENTS, SHIFT
from nvmlib.posterior.log import LOG

PYMM = available_tiers().get("pymm") == "ok"


@pytest.mark.parametrize("name", [LOG, META, COUNT, SHIFT, MOMENTS, COMMIT, "a_b", "x-1.y", "π"])
def test_names_mangle_to_identifiers_and_back(name):
    item = mangle(name)
    assert item.isidentifier() and not item.startswith("-")
    assert unmangle(item) == name


def test_mangling_is_injective_and_foreign_items_are_ignored():
    assert mangle("a_2e") != mangle("a.")
    assert unmangle("posterior_sums") is None and unmangle("nvmlib_size") is None


def test_default_shelf_name_follows_the_directory_and_a_moved_shelf_is_found(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    assert default_name(a).startswith("nvmlib_") and default_name(a) != default_name(
        b
    )  # one name per directory
    assert default_name(a) == default_name(a)
    (a / "nvmlib_0123456789ab.data").write_bytes(b"")  # a shelf made at another path, moved here
    assert default_name(a) == "nvmlib_0123456789ab"


def test_free_bytes_accounts_for_every_array():
    size = 64 << 20
    empty = shelf_free_bytes(size, [])
    assert empty == size // 2 - SHELF_RESERVE - footprint(
        8
    )  # only half a shelf counts (see shelf_free_bytes)
    assert shelf_free_bytes(size, [1000, 3]) == empty - (1000 + ITEM_OVERHEAD) - (8 + ITEM_OVERHEAD)
    assert footprint(LARGE_ITEM) == footprint(2 * LARGE_ITEM - ITEM_OVERHEAD) == 2 * LARGE_ITEM
    assert shelf_free_bytes(size, [size // 2]) == 0


def test_a_posterior_too_big_for_the_shelf_is_refused_with_the_size_needed():
    from nvmlib.posterior import SWAGPosterior

    need = SWAGPosterior.required_bytes(795_010, 3000)
    assert need > shelf_free_bytes(
        520 << 20, []
    )  # a 520 MB shelf cannot hold 3000 rows of model_2fc


def test_missing_pymm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymm", None)  # makes `import pymm` fail, installed or not
    with pytest.raises(
        TierUnavailable, match="IBM PyMM.*github.com/IBM/pymm, commit a506739.*docs/tiers.md"
    ):
        open_store("pymm", "/tmp/unused", size_mb=8)


def test_an_unrelated_pymm_module_is_not_taken_for_ibm_pymm(tmp_path, monkeypatch):
    (tmp_path / "pymm.py").write_text(
        '"""Stands for the unrelated PyPI package named pymm (a GUI)."""\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        sys.modules, "pymm", None
    )  # so that undoing the next line removes the stand-in
    monkeypatch.delitem(sys.modules, "pymm")
    with pytest.raises(TierUnavailable, match="is not IBM PyMM.*do not install it"):
        open_store("pymm", tmp_path / "shelf", size_mb=8)


# ---- with IBM PyMM: what the real library does, and what the adapter makes of it ----------------
needs_pymm = pytest.mark.skipif(
    not PYMM, reason=f"IBM PyMM is not importable here: {available_tiers()['pymm']}"
)
PRELUDE = (
    "import sys, numpy as np\nfrom pathlib import Path\n"
    "from nvmlib.backends import available_tiers, open_store\n"
    "from nvmlib.errors import LockedError\n"
)


def python(code: str, *args: object, stdin: int | None = None) -> subprocess.Popen:
    """A child Python running PRELUDE + code with argv[1:] = args; stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen) -> str:
    """The child's stdout once it exited 0 (its stderr in the failure message otherwise)."""
    out, err = child.communicate(timeout=180)
    assert child.returncode == 0, err
    return out


@needs_pymm
def test_tier_listing_and_shelf_use_print_nothing_on_stdout(tmp_path):
    """PyMM's C core prints a banner on import and Python prints a note per item: a child whose
    stdout is parsed must see only its own lines."""
    out = finish(
        python(
            """
        print(available_tiers()["pymm"])
        with open_store("pymm", sys.argv[1], size_mb=16) as store:
            store.create("x", (3,), "int64")
        with open_store("pymm", sys.argv[1], size_mb=16) as store:  # PyMM notes each item it finds
            print(store.names())
        """,
            tmp_path,
        )
    )
    assert out == "ok\n['x']\n"


@needs_pymm
def test_shelves_in_two_directories_keep_their_own_data(tmp_path):
    """Each new shelf directory gets its own load_addr (PyMM's default maps them all at one
    address)."""
    stores = [open_store("pymm", tmp_path / d, size_mb=16, name=d) for d in "ab"]
    for value, store in enumerate(stores, 1):
        store.create("x", (1000,), "float64")
        store.write_rows("x", 0, np.full(1000, float(value)))
        store.persist("x")
    assert [store.read_rows("x", 0, 1000)[[0, -1]].tolist() for store in stores] == [
        [1.0, 1.0],
        [2.0, 2.0],
    ]
    ranges = [recorded_ranges(tmp_path / d / f"{d}.map") for d in "ab"]
    assert all(ranges) and not any(
        lo < hi2 and lo2 < hi for lo, hi in ranges[0] for lo2, hi2 in ranges[1]
    )
    for store in stores:
        store.close()
    # PyMM keeps a shelf's name for the process's life: another directory's shelf of that name is
    # refused
    with pytest.raises(StoreError, match="already opened a PyMM shelf named 'a'.*another name"):
        open_store("pymm", tmp_path / "c", size_mb=16, name="a")


@needs_pymm
def test_a_shelf_opens_while_an_array_of_a_closed_one_awaits_collection(tmp_path):
    """A closed store's array left in a garbage cycle (as a failed write's traceback that a test
    runner drops) must not crash the forked probe that opens the next shelf: PyMM's shelf memory is
    not in the child (MADV_DONTFORK), so the child may not finalise it (it did: SIGSEGV)."""
    out = finish(
        python(
            """
        import gc
        gc.disable()  # the cycle below stays uncollected until the next shelf opens
        a = open_store("pymm", sys.argv[1], size_mb=16, name="a")
        a.create("x", (2, 40), "float64")
        held = [a.array("x")]
        held.append(held)
        a.close()
        del held
        with open_store("pymm", sys.argv[2], size_mb=16, name="b") as b:
            b.create("y", (3,), "float64")
            print(b.names())
        gc.enable()
        gc.collect()  # the old array is finalised here, where its shelf is still mapped
        print("ok")
        """,
            tmp_path / "a",
            tmp_path / "b",
        )
    )
    assert out == "['y']\nok\n"


@needs_pymm
def test_a_shelf_recorded_at_addresses_in_use_is_refused(tmp_path):
    """Two shelves made by PyMM at one load_addr (its default) cannot be open in one process."""
    make = (
        "import pymm\n"
        "pymm.shelf(sys.argv[2], size_mb=8, pmem_path=sys.argv[1], load_addr='0x580000000000')\n"
    )
    for d in "ab":
        (tmp_path / d).mkdir()
        finish(python(make, tmp_path / d, d))
    out = finish(
        python(
            """
        from nvmlib.errors import StoreError
        first = open_store("pymm", sys.argv[1], size_mb=8, name="a")
        try:
            open_store("pymm", sys.argv[2], size_mb=8, name="b")
        except StoreError as exc:
            print(exc)
        """,
            tmp_path / "a",
            tmp_path / "b",
        )
    )
    assert re.search(
        r"was created at addresses 0x580000000000-.*already uses.*process of its own", out
    )


@needs_pymm
def test_the_same_shelf_twice_in_one_process_is_one_shelf(tmp_path):
    """PyMM cannot open a shelf twice in a process: stores of one shelf share it, one writer at a
    time."""
    first = open_store("pymm", tmp_path, size_mb=16, name="twice")
    second = open_store("pymm", tmp_path, size_mb=16, name="twice")
    reader = open_store("pymm", tmp_path, size_mb=16, name="twice", readonly=True)
    first.create("x", (4,), "int64")
    first.write_rows("x", 0, np.arange(4))
    assert second.names() == ["x"] and reader.read_rows("x", 0, 4).tolist() == [0, 1, 2, 3]
    first.lock("log")
    with pytest.raises(LockedError, match="written by another process|already"):
        second.lock("log")
    with pytest.raises(LockedError, match="already open in this process"):
        open_store("pymm", tmp_path, size_mb=16, name="twice", force_new=True)
    first.unlock("log")
    first.close()  # the others keep working
    second.lock("log")
    second.write_rows("x", 0, np.full(4, 7))
    assert reader.read_rows("x", 0, 4).tolist() == [7] * 4
    second.unlock("log")
    second.close()
    reader.close()
    with open_store("pymm", tmp_path, size_mb=16, name="twice") as again:
        assert again.read_rows("x", 0, 4).tolist() == [7] * 4


@needs_pymm
def test_a_shelf_open_in_another_process_is_locked_not_an_abort(tmp_path):
    """PyMM aborts (SIGABRT) a process that opens a shelf another live process holds: the adapter
    raises LockedError first, and lets the shelf go when its last store closes."""
    holder = python(
        """
        store = open_store("pymm", sys.argv[1], size_mb=16, name="held")
        store.create("x", (3,), "int64")
        store.write_rows("x", 0, np.array([4, 5, 6]))
        print("open", flush=True)
        sys.stdin.readline()
        store.close()
        print("closed", flush=True)
        sys.stdin.readline()
        """,
        tmp_path,
        stdin=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == "open\n", holder.stderr.read()
        for readonly in (False, True):
            with pytest.raises(
                LockedError,
                match=f"open in another process \\(pid {holder.pid}\\).*readers included",
            ):
                open_store("pymm", tmp_path, size_mb=16, name="held", readonly=readonly)
        # what the adapter keeps the caller from: PyMM itself, asked for the held shelf, aborts its
        # process
        with pytest.raises(StoreError, match="killed by SIGABRT.*exclusive lock failed"):
            in_child(
                lambda: _module().shelf("held", size_mb=16, pmem_path=str(tmp_path)),
                "the held shelf",
            )
        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "closed\n"
        with open_store(
            "pymm", tmp_path, size_mb=16, name="held", readonly=True
        ) as reader:  # holder still alive
            assert holder.poll() is None and reader.read_rows("x", 0, 3).tolist() == [4, 5, 6]
    finally:
        finish(holder)  # closing its stdin lets it go on to exit


@needs_pymm
def test_an_array_pymm_cannot_place_is_refused_before_pymm_crashes(tmp_path):
    """hstore-cc cannot place 128 MB, or 60 + 64 MB, on a 256 MB shelf, and PyMM then segfaults."""
    out = finish(
        python(
            """
        from nvmlib.errors import StoreError
        with open_store("pymm", sys.argv[1], size_mb=256) as store:
            for name, mb in (("a", 128), ("b", 64), ("c", 60), ("d", 40)):
                try:
                    store.create(name, (mb << 20,), "uint8")
                    print(name, "made")
                except StoreError as exc:
                    print(name, "refused:", "too small" in str(exc))
        """,
            tmp_path,
        )
    )
    assert out == "a refused: True\nb made\nc refused: True\nd made\n"


@needs_pymm
def test_mapstore_is_reported_volatile_and_keeps_nothing_between_processes(tmp_path):
    store = open_store("pymm", tmp_path, size_mb=16, name="m", engine="mapstore")
    assert not store.persistent and "this process's memory only" in store.describe()
    store.create("x", (2,), "int64")
    store.close()
    make = """
        with open_store("pymm", sys.argv[1], size_mb=16, name="m", engine="mapstore") as store:
            print(store.names())
            store.create("x", (2,), "int64")
        """
    assert [finish(python(make, tmp_path)) for _ in range(2)] == [
        "[]\n"
    ] * 2  # the second sees nothing
    with pytest.raises(
        StoreError, match=r"engine \(its backend=\) .hstore. is not one of hstore-cc, mapstore"
    ):
        open_store("pymm", tmp_path, size_mb=16, engine="hstore")


@needs_pymm
def test_resume_after_a_sigkill_gives_the_uninterrupted_result_and_a_reader_sees_it(tmp_path):
    """A run on a shelf killed mid-epoch resumes exactly; then another process reads the
    posterior."""
    cfg = dict(
        model="model_2conv2fc",
        epochs=2,
        limit=500,
        lr=0.05,
        progress=False,
        backend="pymm",
        shelf_size_mb=64,
        checkpoint_every=3,
    )
    whole = train(TrainConfig(**cfg, posterior_path=str(tmp_path / "whole")))
    killed = python(
        f"""
        import os, signal
        from nvmlib.paper.train import TrainConfig, train
        def kill(epoch, batch):
            if epoch == 1 and batch == 2:  # 9 updates made; the last checkpoint was at 7
                os.kill(os.getpid(), signal.SIGKILL)
        train(TrainConfig(**{cfg!r}, posterior_path=sys.argv[1]), on_batch=kill)
        """,
        tmp_path / "cut",
    )
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    resumed = train(TrainConfig(**cfg, posterior_path=str(tmp_path / "cut"), resume=True))
    assert resumed.record["resumed_from_update"] == 7
    assert resumed.posterior.n_collected == whole.posterior.n_collected == 11
    assert np.array_equal(resumed.posterior.mean(), whole.posterior.mean())
    assert np.array_equal(resumed.posterior.variance(), whole.posterior.variance())
    assert torch.equal(get_flat(resumed.model), get_flat(whole.model))
    expected = whole.posterior.sample(3, seed=1)
    whole.close(), resumed.close()
    finish(
        python(
            """
        from nvmlib.posterior import SWAGPosterior
        with open_store("pymm", sys.argv[1], readonly=True) as store:
            np.save(sys.argv[2], SWAGPosterior.open(store, readonly=True).sample(3, seed=1))
        """,
            tmp_path / "cut",
            tmp_path / "sample.npy",
        )
    )
    np.testing.assert_array_equal(np.load(tmp_path / "sample.npy"), expected)
