"""The package's imports go one way: no circle among nvmlib's modules, counting imports inside
functions (computed from the source), and only nvmlib.dask imports dask."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nvmlib"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(nvmlib module -> the nvmlib modules it imports, module -> top-level packages it imports)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    inside: dict[str, set[str]] = {m: set() for m in modules}
    outside: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "nvmlib":
                    outside[name].add(target.split(".")[0])
                elif target in modules and target != name and target != "nvmlib":
                    inside[name].add(target)
    return inside, outside


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_the_package():
    inside, _ = _graph()
    circle = _circle(inside)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_only_the_dask_module_imports_dask():
    _, outside = _graph()
    users = sorted(m for m, pkgs in outside.items() if {"dask", "distributed"} & pkgs)
    assert users == ["nvmlib.dask"], users
