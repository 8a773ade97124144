"""The workbook as its users meet it: JupyterLab in a real browser (Chromium driven by playwright).

JupyterLab starts from this environment on 127.0.0.1 with a token; every notebook of
reproduce.NOTEBOOKS is copied with its `parameters` cell holding the smoke preset, opened in the
lab, run through the UI (Run > Run All Cells) until the kernel is idle, and saved. The saved
notebook and the page must show no error and no stderr, an image for every figure cell, widget
progress bars, and the notebook's JSON record. A screenshot of each goes to the test's temporary
directory. Skipped, with the reason, where no Chromium is found (scripts/system-deps.sh installs
Debian's as root) or playwright is missing; playwright never downloads a browser here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import nbformat
import pytest
from test_notebooks import noise, parameters_cells

from nvmlib.paper import reproduce, resources

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT_S = 420  # one smoke notebook: 10-40 s alone, minutes on a crowded machine
WIDGET = "application/vnd.jupyter.widget-view+json"
# lab settings for a test: every cell in the DOM (no windowing), no news or update checks
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}
pytestmark = pytest.mark.slow


def chromium() -> str | None:
    """The system's Chromium: $NVMLIB_CHROMIUM, else chromium or chromium-browser on the PATH."""
    found = (
        os.environ.get("NVMLIB_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    return found if found and os.access(found, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_copy(name: str, root: Path) -> None:
    """root/notebooks/name.ipynb: the notebook with the smoke preset (paths under root) in its
    parameters cell."""
    book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    preset = reproduce.parameters("smoke", name, root / "results", root / "figures")
    lines = "\n".join(f"{key} = {value!r}" for key, value in preset.items())
    cell = parameters_cells(book)[0]
    cell.source += f"\n\n# the smoke preset (tests/test_browser.py)\n{lines}\n"
    nbformat.write(book, root / "notebooks" / f"{name}.ipynb")


class Lab:
    """A JupyterLab server on 127.0.0.1 with a token, serving `root`."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        settings = root / "settings"
        for path, values in SETTINGS.items():
            (settings / path).parent.mkdir(parents=True, exist_ok=True)
            (settings / path).write_text(json.dumps(values))
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(root / "config"),
            "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        }
        env.pop("NVMLIB_PROGRESS", None)
        args = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={root / 'workspaces'}",
        ] + (["--allow-root"] if os.getuid() == 0 else [])
        self.log = (root / "lab.log").open("w")
        self.process = subprocess.Popen(
            args, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                self.api("status")
                return
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(
                        f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}"
                    ) from exc
                time.sleep(0.5)

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernel_idle(self, path: str) -> bool:
        """Whether the kernel of the notebook at `path` (relative to root) has started and is
        idle."""
        states = [s["kernel"]["execution_state"] for s in self.api("sessions") if s["path"] == path]
        return states == ["idle"]

    def end_sessions(self) -> None:
        """Shut down every notebook's kernel (the browser has left the lab first)."""
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    if chromium() is None:
        pytest.skip(
            "no Chromium found: install Debian's chromium (scripts/system-deps.sh does as root) "
            "or set NVMLIB_CHROMIUM to a Chromium binary"
        )
    pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    for name in reproduce.NOTEBOOKS:
        smoke_copy(name, root)
    server = Lab(root)
    yield server
    server.close()


@pytest.fixture(scope="module")
def page(lab: Lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def wait_for_idle(lab: Lab, page, path: str, timeout_s: float) -> None:
    """Until every code cell of the open notebook has run or the run stopped, and its kernel is
    idle."""
    prompts = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        texts = [t.strip() for t in page.locator(prompts).all_inner_texts()]
        if (
            texts
            and "[*]:" not in texts
            and re.fullmatch(r"\[\d+\]:", texts[0])
            and lab.kernel_idle(path)
        ):
            return
        time.sleep(1)
    raise AssertionError(f"the notebook did not finish within {timeout_s:.0f} s: prompts {texts}")


def saved(path: Path, timeout_s: float = 30) -> nbformat.NotebookNode:
    """The notebook on disk once the lab has saved it with its outputs."""
    deadline = time.monotonic() + timeout_s
    while True:
        book = nbformat.read(path, as_version=4)
        if any(c.get("execution_count") for c in book.cells) or time.monotonic() > deadline:
            return book
        time.sleep(0.5)


@pytest.mark.parametrize("name", reproduce.NOTEBOOKS)
def test_notebook_runs_all_in_jupyterlab(lab: Lab, page, name: str, tmp_path: Path) -> None:
    preset = reproduce.parameters("smoke", name, lab.root / "results", lab.root / "figures")
    short = resources.plan({name: preset}, lab.root / "results" / "scratch").shortfalls(
        resources.Machine.here()
    )
    if short:
        pytest.skip(f"{name} at smoke scale: {'; '.join(short)}")
    started, path = time.time(), f"notebooks/{name}.ipynb"
    try:
        page.goto(
            f"{lab.url}/lab/tree/{path}?reset&token={lab.token}"
        )  # reset: only this notebook open
        page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell").first.wait_for(
            timeout=90_000
        )
        deadline = time.monotonic() + 90
        while not lab.kernel_idle(path):  # the kernel has started
            assert time.monotonic() < deadline, "the notebook's kernel did not start"
            time.sleep(0.5)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        wait_for_idle(lab, page, path, RUN_TIMEOUT_S)
        page.keyboard.press("Control+s")
        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        if panel.locator(".jp-RenderedImage img").count():
            panel.locator(".jp-RenderedImage img").last.scroll_into_view_if_needed()
        page.screenshot(path=tmp_path / f"{name}.png")
        book = saved(lab.root / path)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), "every cell ran"
        assert noise(book) == [], "no error or stderr in any cell"
        assert panel.locator('[data-mime-type="application/vnd.jupyter.stderr"]').count() == 0
        figure_cells = [c for c in code if "plots.save(" in c.source]
        for cell in figure_cells:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), (
                f"no figure from {cell.source[:60]!r}"
            )
        images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
        assert panel.locator(".jp-RenderedImage img").count() == images >= len(figure_cells)
        widgets = sum(WIDGET in o.get("data", {}) for c in code for o in c.outputs)
        assert panel.locator(".jp-OutputArea-output .widget-hprogress").count() == widgets
        assert "Error displaying widget" not in panel.inner_text()
        record = lab.root / "results" / f"{name}.json"
        assert record.stat().st_mtime >= started - 1, (
            "the notebook's JSON record was written by this run"
        )
        assert json.loads(record.read_text())["experiment"] == name
    finally:
        page.goto("about:blank")
        lab.end_sessions()


def test_progress_bars_are_widgets_in_the_lab(lab: Lab) -> None:
    """Training shows tqdm widgets in the lab (text under papermill: tests/test_notebooks.py)."""
    book = nbformat.read(lab.root / "notebooks" / "collect.ipynb", as_version=4)
    if not any(c.get("execution_count") for c in book.cells):
        pytest.skip("collect did not run in the lab in this session")
    assert any(WIDGET in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))


def test_make_lab_starts_as_this_user(tmp_path: Path) -> None:
    """`make lab` (as root it adds --allow-root) serves the checkout and prints the notebooks'
    URL."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = Path(sys.prefix)
    port = free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
    }
    env.pop("DISPLAY", None)
    process = subprocess.Popen(
        ["make", "-o", str(venv / ".nvmlib-installed"), "lab", f"VENV={venv}", f"LAB_PORT={port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 90
        url = None
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            lines.append(line)
            found = re.search(rf"http://127\.0\.0\.1:{port}/lab/tree/notebooks\?token=\w+", line)
            url = found.group(0) if found else None
        assert url, "".join(lines)
        while True:  # the server prints its URL a moment before it listens
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    assert response.status == 200
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, f"nothing answers at {url}"
                time.sleep(0.5)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
    assert ("--allow-root" in "".join(lines)) == (os.getuid() == 0)
