"""`nvmlib train` / `nvmlib evaluate` accept the paper's flags and fail in user terms (exit 2)."""

import json
import re

import pandas as pd
import pytest

from nvmlib.backends import available_tiers, open_store
from nvmlib.paper.cli import build_parser, main
from nvmlib.posterior import SWAGPosterior


def test_paper_commands_parse_with_only_the_script_name_changed():
    parser = build_parser()
    dram = parser.parse_args(
        "train model_4fc -p /mnt/nvme0/models/ -c 1 -e 75 "
        "--results_filepath mnist_dram_mm_model_4fc_e75.gpu.csv".split()
    )
    assert (dram.model, dram.data_path, dram.gpu, dram.epochs, dram.backend) == (
        "model_4fc",
        "/mnt/nvme0/models/",
        1,
        75,
        None,
    )
    pymm = parser.parse_args(
        "train model_4fc -p /mnt/nvme0/models/ -f /mnt/pmem0 -c 1 -s 520000 -e 75 "
        "-back hstore-cc -b 100 -n 1e-4 -m 0 -r 1 -K 10 "
        "--results_filepath mnist_pymm_dax_model_4fc_e75.gpu.csv".split()
    )
    assert (pymm.shelf_path, pymm.shelf_size_mb, pymm.shelf_backend, pymm.max_rank) == (
        "/mnt/pmem0",
        520000,
        "hstore-cc",
        10,
    )
    mmap = parser.parse_args(
        "train model_4fc -p /mnt/nvme0/models/ -c 1 --posterior_path /mnt/nvme0/mmap/ "
        "-e 75 --results_filepath mnist_mmap_model_4fc_e75.gpu.csv".split()
    )
    assert mmap.posterior_path == "/mnt/nvme0/mmap/"


def test_train_then_evaluate_on_mmap(tmp_path, capsys, monkeypatch):
    post_dir, csv = tmp_path / "mmap", tmp_path / "run.csv"
    assert (
        main(
            [
                "train",
                "model_2conv2fc",
                "-c",
                "-1",
                "-e",
                "1",
                "--limit",
                "300",
                "-n",
                "0.05",
                "--posterior_path",
                str(post_dir),
                "--results_filepath",
                str(csv),
                "--no_progress",
            ]
        )
        == 0
    )
    assert "epoch 1 time (s)" in pd.read_csv(csv, index_col=0).index
    post = SWAGPosterior.open(
        open_store("mmap", post_dir), readonly=True
    )  # the tier inferred from the path
    assert post.n_collected == 4
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--posterior_path",
                str(post_dir),
                "-S",
                "2",
                "--angles",
                "0",
                "45",
                "--results_filepath",
                str(out),
            ]
        )
        == 0
    )
    assert "SWAG" in capsys.readouterr().out
    assert {r["method"] for r in json.loads(out.read_text())["metrics"]} == {"SGD", "SWA", "SWAG"}
    assert json.loads(out.read_text())["ood"]  # Debian's Fashion-MNIST: OOD AUROC per method
    capsys.readouterr()
    # --train_results is accepted (devdax devices and shelves need it; a directory tier finds its
    # state itself); a machine without Fashion-MNIST gets the other metrics and a note, not an error
    monkeypatch.setattr("nvmlib.paper.data.FASHION_DIR", tmp_path / "no-fashion")
    assert (
        main(
            [
                "evaluate",
                "--posterior_path",
                str(post_dir),
                "-S",
                "2",
                "--angles",
                "0",
                "--train_results",
                str(csv),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert (
        "no OOD evaluation" in captured.err
        and "SWAG" in captured.out
        and "auroc" not in captured.out
    )


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "model_5fc"], "unknown model"),
        (["train", "model_2fc", "-p", "/nonexistent/data"], "does not exist"),
        (["train", "model_2fc", "-c", "7"], "GPU 7"),
        (["train", "model_4fc", "-e", "10000000"], "needs .* GB"),
        (["evaluate"], "dram posterior does not outlive"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(argv, match, capsys):
    assert main(argv + ["--no_progress"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nvmlib: error: ") and "Traceback" not in err
    assert re.search(match, err)


def test_pymm_shelf_too_small_or_pymm_missing_exits_2(tmp_path, capsys):
    pymm = available_tiers()["pymm"] == "ok"
    assert (
        main(["train", "model_2fc", "-f", str(tmp_path / "shelf"), "-s", "10", "--no_progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("nvmlib: error: ") and "Traceback" not in err
    assert re.search(
        "the shelf is 10 MB; pass -s 18[0-9][0-9]" if pymm else "pymm tier needs IBM PyMM", err
    )


def test_unwritable_results_path_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", "model_2fc", "--results_filepath", str(tmp_path / "file" / "x.csv")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["train", "model_2fc", "--dtype", "bogus"], "invalid choice: 'bogus'"),
        (["train", "model_2fc", "--dtype", "int32"], "invalid choice: 'int32'"),
        (["train", "model_2fc", "-n", "-1"], "-n: -1 is out of range"),
        (["train", "model_2fc", "-n", "nan"], "-n: nan is out of range"),
        (["evaluate", "--posterior_path", "x", "-S", "0"], "-S: 0 is out of range"),
        (["evaluate", "--posterior_path", "x", "--scale", "-1"], "--scale: -1 is out of range"),
        (["evaluate", "--posterior_path", "x", "--scale", "nan"], "--scale: nan is out of range"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and msg in err and "Traceback" not in err


def test_divergence_is_a_one_line_error(tmp_path, capsys):
    code = main(
        [
            "train",
            "model_2fc",
            "-e",
            "1",
            "--limit",
            "1000",
            "-n",
            "1e10",
            "--posterior_path",
            str(tmp_path / "p"),
            "--no_progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "training diverged: lower the learning rate" in err
