"""The resource check: each preset's peak memory and disk, computed before any work, and a run
refused at once, with need versus have, when the machine cannot hold it."""

from __future__ import annotations

from pathlib import Path

from nvmlib.paper import reproduce, resources
from nvmlib.paper.models import make_model, n_params
from nvmlib.posterior import SWAGPosterior

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def plan(scale: str, tmp_path: Path) -> resources.Plan:
    return reproduce.plan_run(scale, tmp_path / "results", tmp_path / "figures")[1]


def test_every_notebook_declares_its_needs() -> None:
    assert set(reproduce.NOTEBOOKS) <= set(resources.NEEDS), (
        "add the notebook's function to resources.NEEDS"
    )


def test_default_preset_fits_a_laptop(tmp_path: Path) -> None:
    """8 GB of RAM with the peak resident set at most 6 GB, and 20 GB of disk."""
    needs = plan("default", tmp_path)
    assert needs.needs.memory <= 6 * GB and sum(needs.disk().values()) <= 20 * GB
    laptop = resources.Machine(
        memory_available=6 * GB, memory_total=8 * GB, disk_free=lambda path: 20 * GB
    )
    assert needs.shortfalls(laptop) == []


def test_the_dram_tier_posterior_dominates_tier_runtime(tmp_path: Path) -> None:
    p = reproduce.parameters("default", "tier_runtime", tmp_path, tmp_path)
    n = n_params(make_model("model_2fc"))
    dram = SWAGPosterior.required_bytes(n, p["max_rank"], "float32")
    needs = resources.needs_of("tier_runtime", p)
    assert dram < needs.memory < dram + 2 * GB
    assert needs.scratch == dram  # the mmap and pmem logs, one after the other (each removed)


def test_rows_follow_train_capacity() -> None:
    assert resources.kept_rows({"epochs": 6, "limit": None}) == 3601
    assert resources.kept_rows({"epochs": 6, "swag_start": 3, "record_every": 10}) == 181
    assert resources.kept_rows({"epochs": 6, "max_rank": 1000}) == 1000
    assert resources.kept_rows({"epochs": 2, "limit": 500}) == 11


def test_phases_in_turn_take_the_largest_and_kept_paths_add_up() -> None:
    a = resources.Needs(memory=5, scratch=1, kept={"/x": 2})
    b = resources.Needs(memory=3, scratch=4, kept={"/x": 1, "/y": 7})
    assert resources.one_after_another([a, b]) == resources.Needs(5, 4, {"/x": 3, "/y": 7})
    assert a + b == resources.Needs(8, 5, {"/x": 3, "/y": 7})


def test_a_small_machine_is_told_need_and_have(tmp_path: Path) -> None:
    small = resources.Machine(
        memory_available=2 * GB, memory_total=4 * GB, disk_free=lambda path: 0.5 * GB
    )
    default = plan("default", tmp_path)
    assert default.needs.memory > 2 * GB and default.needs.scratch > 0.5 * GB
    short = default.shortfalls(small)
    assert len(short) == 2
    assert short[0] == (
        f"memory: needs {resources.size(default.needs.memory)} at its peak (cluster), "
        "this machine has 2.0 GB available of 4.0 GB"
    )
    assert short[1].startswith(f"disk: needs {resources.size(default.needs.scratch)} under ")
    assert short[1].endswith("whose file system has 0.5 GB free")
    assert plan("smoke", tmp_path).shortfalls(small) == []


def test_reproduce_refuses_a_preset_that_cannot_fit_before_any_work(tmp_path: Path, capsys) -> None:
    """The paper preset keeps 75 epochs of model_4fc (503 GB) on the DRAM tier."""
    status = reproduce.main(
        [
            "--scale",
            "paper",
            "--notebooks-dir",
            str(ROOT / "notebooks"),
            "--results-dir",
            str(tmp_path / "results"),
            "--figures-dir",
            str(tmp_path / "figures"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert (
        "the paper preset cannot run on this machine: memory: needs 505." in err
        and "GB available of" in err
    )
    assert "--scale smoke" in err and "fits here" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "figures").exists(), (
        "nothing ran"
    )


def test_check_only_says_what_a_run_needs(tmp_path: Path, capsys) -> None:
    status = reproduce.main(
        ["--scale", "smoke", "--check", "--results-dir", str(tmp_path / "results")]
    )
    peak = plan("smoke", tmp_path / "results").needs.memory
    assert (
        status == 0
        and f"the smoke preset needs {peak / GB:.1f} GB of memory" in capsys.readouterr().out
    )
    assert not (tmp_path / "results").exists()


def test_an_unknown_notebook_needs_the_bare_kernel() -> None:
    assert resources.needs_of("not-declared", {}) == resources.Needs(memory=resources.KERNEL_BYTES)
