"""Every notebook runs under papermill at smoke scale, writes its JSON record and real figures;
the notebooks in git carry no outputs and exactly one `parameters` cell."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_plots import assert_image

from nvmlib.errors import ConfigError
from nvmlib.paper import reproduce

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIGURES = {
    "collect": ["collect-epochs"],
    "tier_runtime": ["tier_runtime"],
    "posterior_quality": [
        "posterior_quality-rank",
        "posterior_quality-rotated",
        "posterior_quality-reliability",
        "posterior_quality-ood",
    ],
    "sampling": ["sampling"],
    "any_model": ["any_model-metrics", "any_model-reliability", "any_model-cost"],
    "cluster": ["cluster"],
}


def parameters_cells(book: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in book.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("name", reproduce.NOTEBOOKS)
def test_notebook_is_clean_and_parameterised(name: str) -> None:
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    assert book.metadata.kernelspec.name == "python3"
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        "commit notebooks without outputs"
    )
    cells = parameters_cells(book)
    assert len(cells) == 1
    defined: dict = {}
    exec(cells[0].source, {}, defined)  # plain assignments only
    for scale in reproduce.SCALES:
        injected = reproduce.parameters(scale, name, Path("results"), Path("figures"))
        assert set(injected) <= set(defined), (
            f"{scale} injects parameters the notebook does not declare"
        )


def test_every_notebook_has_a_preset_at_every_scale() -> None:
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(reproduce.NOTEBOOKS)
    for scale in reproduce.SCALES.values():
        assert set(scale) == set(reproduce.NOTEBOOKS)


def test_kernel_must_run_this_python() -> None:
    reproduce.check_kernel("python3")
    with pytest.raises(ConfigError, match="no Jupyter kernel"):
        reproduce.check_kernel("no-such-kernel-nvmlib")


def test_the_kernel_talks_over_private_unix_sockets_and_warns_nothing_on_the_terminal(
    tmp_path, capfd
) -> None:
    """ipykernel warns on the terminal, once per notebook, when it runs over TCP without encryption:
    reproduce's kernels use the ipc transport instead, and a cell's own warnings still reach the
    notebook."""
    book = nbformat.v4.new_notebook(
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        }
    )
    book.cells = [
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import json, sys, warnings\n"
            "from ipykernel import get_connection_file\n"
            "print(json.load(open(get_connection_file()))['transport'], 2 * x)\n"
            "warnings.warn('a warning of the cell')"
        ),
    ]
    nbformat.write(book, tmp_path / "tiny.ipynb")
    reproduce.execute(
        tmp_path / "tiny.ipynb", tmp_path / "out.ipynb", {"x": 21}, "python3", tmp_path
    )
    err = capfd.readouterr().err
    assert "without encryption" not in err and "WARNING" not in err, err
    outputs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs
    assert [o.text for o in outputs if o.name == "stdout"] == ["ipc 42\n"]
    assert any("a warning of the cell" in o.text for o in outputs if o.name == "stderr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ipynb", "tiny.ipynb"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """`nvmlib reproduce --scale smoke` into a temporary directory, once for this module, as a user
    runs it: a process started by a shell. (Linux hands a process the peak RSS of the one it was
    forked from when it execs; forked by the shell, not by this large pytest process, its peak RSS
    is the run's own.)"""
    out = tmp_path_factory.mktemp("reproduce")
    args = [
        sys.executable,
        "-m",
        "nvmlib.paper.reproduce",
        "--scale",
        "smoke",
        "--notebooks-dir",
        str(NOTEBOOKS),
        "--results-dir",
        str(out / "results"),
        "--figures-dir",
        str(out / "figures"),
    ]
    subprocess.run(
        ["bash", "-c", '"$@"; exit $?', "bash", *args], check=True
    )  # two commands: bash forks
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", reproduce.NOTEBOOKS)
def test_smoke_run_writes_record_and_figures(smoke: Path, name: str) -> None:
    record = json.loads((smoke / "results" / f"{name}.json").read_text())
    assert record["experiment"] == name
    assert record["parameters"]["seed"] == 0 and record["measured"] and record["versions"]["nvmlib"]
    executed = nbformat.read(smoke / "results" / f"{name}.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters["results_dir"] == str(
        (smoke / "results").resolve()
    )
    for figure in FIGURES[name]:
        for suffix in (".png", ".pdf"):
            assert_image(smoke / "figures" / f"{figure}{suffix}")
    assert not any((smoke / "results" / "scratch").glob("*/*")), (
        "scratch posteriors must be removed"
    )


def noise(book: nbformat.NotebookNode) -> list[str]:
    """Errors and stderr (warnings included) in the outputs of an executed notebook."""
    return [
        o.get("text") or f"{o.get('ename')}: {o.get('evalue')}"
        for c in book.cells
        for o in c.get("outputs", [])
        if o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", reproduce.NOTEBOOKS)
def test_smoke_run_is_quiet_and_its_figures_say_how_they_were_made(smoke: Path, name: str) -> None:
    executed = nbformat.read(smoke / "results" / f"{name}.ipynb", as_version=4)
    assert noise(executed) == []
    record = json.loads((smoke / "results" / f"{name}.json").read_text())
    if FIGURES.get(name):
        assert record["measured"]["caption"].startswith("smoke preset · ")
    widgets = [
        o
        for c in executed.cells
        for o in c.get("outputs", [])
        if "data" in o and "application/vnd.jupyter.widget-view+json" in o.data
    ]
    assert widgets == [], (
        "under papermill progress bars are text (a widget keeps only its first frame)"
    )


@pytest.mark.slow
def test_smoke_run_records_its_peak_memory_within_the_estimate(smoke: Path) -> None:
    summary = json.loads((smoke / "results" / "reproduce.json").read_text())
    estimate = max(n["memory"] for n in summary["estimated_bytes"].values())
    assert 100e6 < summary["peak_rss_bytes"] <= estimate
    executed = nbformat.read(smoke / "results" / "collect.ipynb", as_version=4)
    text = "".join(
        o.get("text", "")
        for c in executed.cells
        for o in c.get("outputs", [])
        if o.output_type == "stream"
    )
    assert "100%|" in text and "\r" not in text, (
        "the progress bar's last line, carriage returns resolved"
    )


@pytest.mark.slow
def test_smoke_tier_runtime_is_relative_to_dram(smoke: Path) -> None:
    runtime = json.loads((smoke / "results" / "tier_runtime.json").read_text())["measured"][
        "runtime"
    ]
    dram = [r for r in runtime if r["backend"] == "dram"]
    assert {r["epochs"] for r in dram} == {1, 2}
    assert all(
        r["epoch_ratio"] == pytest.approx(1.0) and r["total_ratio"] == pytest.approx(1.0)
        for r in dram
    )
    assert all(r["epoch_s"] > 0 and r["write_MBps"] > 0 for r in runtime)
    table = (smoke / "results" / "tier_ratios.md").read_text().splitlines()
    assert table[0].startswith("| epochs | mmap / DRAM") and [
        row.split("|")[1].strip() for row in table[2:]
    ] == ["1", "2"]
    summary = json.loads((smoke / "results" / "reproduce.json").read_text())
    assert summary["scale"] == "smoke" and set(summary["seconds"]) == set(reproduce.NOTEBOOKS)


def test_a_failing_notebook_fails_the_run_and_keeps_its_executed_copy(
    tmp_path: Path, capsys
) -> None:
    book = nbformat.read(NOTEBOOKS / "collect.ipynb", as_version=4)
    book.cells = parameters_cells(book) + [nbformat.v4.new_code_cell("raise RuntimeError('boom')")]
    (tmp_path / "notebooks").mkdir()
    nbformat.write(book, tmp_path / "notebooks" / "collect.ipynb")
    status = reproduce.main(
        [
            "--scale",
            "smoke",
            "--notebook",
            "collect",
            "--notebooks-dir",
            str(tmp_path / "notebooks"),
            "--results-dir",
            str(tmp_path / "results"),
            "--figures-dir",
            str(tmp_path / "figures"),
        ]
    )
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and re.fullmatch(
        r"nvmlib: error: the notebook .*collect.ipynb failed in cell \d+: "
        r"RuntimeError: boom; see the executed copy .*collect.ipynb",
        err[-1],
    )
    assert (tmp_path / "results" / "collect.ipynb").exists()
