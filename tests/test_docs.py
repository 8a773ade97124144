"""The documentation site builds offline with --strict (no broken link, no docstring mkdocstrings
cannot render), and every page of docs/ is in its navigation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strict_with_every_page(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (make setup does)")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("SWAGPosterior", "MultiSWAG", "open_store", "StoreError"):
        assert name in api, f"the API page lacks {name}"
    assert (tmp_path / "site" / "figures" / "tier_runtime.png").stat().st_size > 10_000
