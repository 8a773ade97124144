"""Every `nvmlib` subcommand, run as a real process on damaged, missing, unwritable and hostile
input, exits non-zero with one `nvmlib: error:` line as the last line of stderr, no traceback
anywhere, and no file changed.

Usage errors keep argparse's format: the subcommand's usage, then `nvmlib <command>: error: ...`.
The subcommands come from the parser itself, and every numeric option of each one gets `-3` and
(floats) `nan` (the first also `abc`), so a new subcommand or option is walked without editing this
file (a new subcommand needs a BASE invocation: test_every_subcommand_is_walked says so). The
cases run as processes forked, a few at a time, by one that imported nvmlib's CLI (and torch)
once: each is `sys.exit(nvmlib.paper.cli.main(argv))` in a process of its own, as `python -m
nvmlib.paper.cli` runs it, without an import of torch per case."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from nvmlib.paper.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# a valid invocation of each subcommand, quick to refuse: {tmp} the case's directory, {good} a
# finished run's posterior (mmap; a case that damages it gets its own copy, {tmp}/copy)
BASE: dict[str, list[str]] = {
    "train": [
        "train",
        "model_2conv2fc",
        "--limit",
        "100",
        "--no_progress",
        "--posterior_path",
        "{tmp}/p",
    ],
    "evaluate": [
        "evaluate",
        "--posterior_path",
        "{good}",
        "-S",
        "1",
        "--limit",
        "20",
        "--angles",
        "0",
    ],
    "probe": ["probe", "{tmp}", "--size-mb", "1"],
    "reproduce": [
        "reproduce",
        "--check",
        "--scale",
        "smoke",
        "--results-dir",
        "{tmp}/r",
        "--figures-dir",
        "{tmp}/f",
    ],
}
NEGATIVE_OK = {"-c": "a negative GPU id is the CPU", "--angles": "a rotation in degrees"}
GOOD = ["train", "model_2conv2fc", "--limit", "100", "-K", "3", "--no_progress", "--posterior_path"]
RESUME = [*GOOD, "{tmp}/copy", "--resume"]
EVALUATE_COPY = [
    "evaluate",
    "--posterior_path",
    "{tmp}/copy",
    "-S",
    "1",
    "--limit",
    "20",
    "--angles",
    "0",
]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def numeric_options(parser: argparse.ArgumentParser) -> list[tuple[str, type]]:
    """(flag, int or float) of each option whose value is a number."""
    found = []
    for action in parser._actions:
        if action.option_strings and action.type is not None and action.nargs != 0:
            kind = type(action.type("1"))
            if kind in (int, float):
                found.append((action.option_strings[0], kind))
    return found


def damage(name: str, how: Callable[[bytes], bytes] | None) -> Callable[[Path, Path], None]:
    """A setup copying the good run to {tmp}/copy with its file `name` rewritten by `how` (None:
    removed)."""

    def setup(tmp: Path, good: Path) -> None:
        path = Path(shutil.copytree(good, tmp / "copy")) / name
        if how is None:
            path.unlink()
        else:
            path.write_bytes(how(path.read_bytes()))

    return setup


def hostile_paths(tmp: Path, good: Path) -> None:
    (tmp / "file").write_text("not a directory\n")
    (tmp / "loop").symlink_to(tmp / "loop")
    (tmp / "dangling").symlink_to(tmp / "nowhere")


@dataclass
class Case:
    id: str
    argv: list[str]
    match: str = ""  # in the error line ("" : the flag or the value, for bad numbers)
    setup: Callable[[Path, Path], None] = hostile_paths
    env: dict[str, str] | None = None


STATES = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "garbage": lambda b: os.urandom(len(b)),
    "another pickle": lambda b: b"\x80\x04K\x01.",
}
POSTERIORS = {
    "truncated log": ("swag.log.npy", lambda b: b[:200]),
    "no moments": ("swag.moments.npy", None),
    "garbage meta": ("swag.meta.npy", lambda b: os.urandom(len(b))),
}
CASES = [
    Case(
        "train --posterior_path file",
        ["train", "model_2conv2fc", "--posterior_path", "{tmp}/file"],
        "is a file, not a directory",
    ),
    Case(
        "train --posterior_path /proc",
        ["train", "model_2conv2fc", "--posterior_path", "/proc/nvmlib"],
        "/proc/nvmlib",
    ),
    Case(
        "train --posterior_path loop",
        ["train", "model_2conv2fc", "--posterior_path", "{tmp}/loop"],
        "loop",
    ),
    Case(
        "train --posterior_path dangling",
        ["train", "model_2conv2fc", "--posterior_path", "{tmp}/dangling"],
        "dangling",
    ),
    Case("train -p missing", ["train", "model_2conv2fc", "-p", "{tmp}/missing"], "missing"),
    Case("train -p file", ["train", "model_2conv2fc", "-p", "{tmp}/file"], "file"),
    Case(
        "train --results_filepath /proc",
        ["train", "model_2conv2fc", "--results_filepath", "/proc/nvmlib/run.csv"],
        "--results_filepath",
    ),
    Case("train --resume nothing there", [*GOOD, "{tmp}/missing", "--resume"], "missing"),
    Case(
        "train codec threads abc",
        [*BASE["train"], "--codec", "delta-zstd"],
        "NVMLIB_CODEC_THREADS='abc'",
        env={"NVMLIB_CODEC_THREADS": "abc"},
    ),
    Case(
        "evaluate --posterior_path missing",
        ["evaluate", "--posterior_path", "{tmp}/missing"],
        "missing",
    ),
    Case("evaluate --posterior_path file", ["evaluate", "--posterior_path", "{tmp}/file"], "file"),
    Case("evaluate --posterior_path loop", ["evaluate", "--posterior_path", "{tmp}/loop"], "loop"),
    Case("evaluate --posterior_path /proc", ["evaluate", "--posterior_path", "/proc"], "/proc"),
    Case("evaluate -p missing", [*BASE["evaluate"], "-p", "{tmp}/missing"], "missing"),
    Case(
        "evaluate --fashion_path file", [*BASE["evaluate"], "--fashion_path", "{tmp}/file"], "file"
    ),
    Case(
        "evaluate --results_filepath /proc",
        [*BASE["evaluate"], "--results_filepath", "/proc/nvmlib/m.json"],
        "--results_filepath",
    ),
    Case(
        "evaluate --scheduler nonsense", [*BASE["evaluate"], "--scheduler", "nonsense"], "scheduler"
    ),
    Case("probe missing", ["probe", "{tmp}/missing"], "does not exist"),
    Case("probe file", ["probe", "{tmp}/file"], "is a file"),
    Case("probe dangling", ["probe", "{tmp}/dangling"], "does not exist"),
    Case("probe /proc", ["probe", "/proc"], "cannot measure /proc"),
    Case("probe /sys", ["probe", "/sys", "--size-mb", "1"], "cannot measure /sys"),
    Case("reproduce --scale bogus", ["reproduce", "--scale", "bogus"], "bogus"),
    Case("reproduce --notebook bogus", ["reproduce", "--notebook", "bogus"], "bogus"),
    Case(
        "reproduce --notebooks-dir missing",
        ["reproduce", "--scale", "smoke", "--notebooks-dir", "{tmp}/missing"],
        "--notebooks-dir",
    ),
    Case(
        "reproduce --results-dir /proc",
        ["reproduce", "--scale", "smoke", "--results-dir", "/proc/nvmlib"],
        "--results-dir",
    ),
    Case(
        "reproduce --results-dir file",
        ["reproduce", "--scale", "smoke", "--results-dir", "{tmp}/file"],
        "is a file, not a directory",
    ),
    Case(
        "reproduce --figures-dir /proc",
        [
            "reproduce",
            "--scale",
            "smoke",
            "--results-dir",
            "{tmp}/r",
            "--figures-dir",
            "/proc/nvmlib",
        ],
        "--figures-dir",
    ),
    Case(
        "reproduce --kernel missing",
        ["reproduce", "--scale", "smoke", "--kernel", "no-such-kernel"],
        "no-such-kernel",
    ),
    *[
        Case(
            f"{what} with a {state} train state",
            argv,
            "--overwrite",
            damage("train_state.pt", STATES[state]),
        )
        for what, argv, state in (
            ("evaluate", EVALUATE_COPY, "empty"),
            ("evaluate", EVALUATE_COPY, "another pickle"),
            ("resume", RESUME, "truncated"),
            ("resume", RESUME, "garbage"),
        )
    ],
    *[
        Case(f"{what} of a posterior with a {kind}", argv, "copy", damage(*POSTERIORS[kind]))
        for what, argv, kind in (
            ("evaluate", EVALUATE_COPY, "truncated log"),
            ("resume", RESUME, "no moments"),
            ("evaluate", EVALUATE_COPY, "garbage meta"),
        )
    ],
    *[
        Case(f"{name} {flag} {value}", [*BASE[name], flag, value])
        for name, parser in subcommands().items()
        if name in BASE
        for i, (flag, kind) in enumerate(
            numeric_options(parser)
        )  # argparse's int/float say "abc" once
        for value in ["abc"] * (i == 0)
        + ["-3"] * (flag not in NEGATIVE_OK)
        + ["nan"] * (kind is float)
    ],
]


def nvmlib(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`nvmlib ARGV` as a user runs it (this checkout's nvmlib)."""
    return subprocess.run(
        [sys.executable, "-m", "nvmlib.paper.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=_environment(env),
    )


def _environment(env: dict[str, str] | None = None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(env or {})}


# Reads [[argv, env, stdout file, stderr file], ...] on stdin; forks a child for each (4 at a time)
# that runs it with its stdout and stderr on those files; prints the exit codes as JSON.
FORKER = """
import json, os, sys
# what the subcommands import
import nvmlib.paper.cli, nvmlib.paper.data, nvmlib.paper.evaluate, nvmlib.paper.train
cases, running, codes = json.load(sys.stdin), {}, {}
for i, (argv, env, out, err) in enumerate(cases):
    if len(running) == 4:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, out), (2, err)):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.environ.update(env)
        sys.argv = ["nvmlib", *argv]
        sys.exit(nvmlib.paper.cli.main(argv))
    running[pid] = i
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(cases))]))
"""


def nvmlib_forked(
    runs: list[tuple[list[str], dict[str, str]]], io: Path
) -> list[subprocess.CompletedProcess]:
    """Each (argv, env) run as `nvmlib ARGV` in a process forked by one that imported the CLI."""
    files = [(str(io / f"{i}.out"), str(io / f"{i}.err")) for i in range(len(runs))]
    cases = json.dumps([[argv, env, *f] for (argv, env), f in zip(runs, files, strict=True)])
    done = subprocess.run(
        [sys.executable, "-c", FORKER],
        input=cases,
        capture_output=True,
        text=True,
        timeout=900,
        env=_environment(),
    )
    assert done.returncode == 0, done.stderr
    return [
        subprocess.CompletedProcess(argv, code, Path(out).read_text(), Path(err).read_text())
        for (argv, _), code, (out, err) in zip(runs, json.loads(done.stdout), files, strict=True)
    ]


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (not the writer's lock, which records who holds
    it)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict]]:
    """Every case run: id -> (the process, the files before, the files after)."""
    good = tmp_path_factory.mktemp("good") / "p"
    trained = nvmlib([*GOOD, str(good)])
    assert trained.returncode == 0, trained.stderr
    base, io = tmp_path_factory.mktemp("walk"), tmp_path_factory.mktemp("io")

    def good_digest() -> dict[str, str]:
        return {f"good/{k}": v for k, v in digest(good).items()}

    runs, before = [], []
    for i, case in enumerate(CASES):
        tmp = base / str(i)
        tmp.mkdir()
        case.setup(tmp, good)
        before.append(digest(tmp) | good_digest())
        runs.append(([a.format(tmp=tmp, good=good) for a in case.argv], case.env or {}))
    done = nvmlib_forked(runs, io)
    return {
        case.id: (done[i], before[i], digest(base / str(i)) | good_digest())
        for i, case in enumerate(CASES)
    }


def test_every_subcommand_is_walked():
    missing = set(subcommands()) - set(BASE)
    assert not missing, f"add a quick valid invocation of {sorted(missing)} to BASE"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input_is_one_error_line_and_changes_nothing(case, walk):
    done, before, after = walk[case.id]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stderr.splitlines()
    errors = [line for line in lines if re.match(r"nvmlib( \w+)?: error: ", line)]
    assert done.returncode != 0 and len(errors) == 1 and lines[-1] == errors[0], done.stderr
    usage = errors[0].startswith(f"nvmlib {case.argv[0]}: error: ")  # argparse's own format
    assert usage == lines[0].startswith("usage: "), done.stderr
    assert (
        (case.match or case.argv[-1]) in errors[0] or not case.match and case.argv[-2] in errors[0]
    )
    assert after == before, "a refused command changes no file"
