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
                return stack[stack.index(nxt) :] + [nxt]
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


FLOORS = {  # a floor may import only these floors of nvmlib (and itself)
    "nvmlib.errors": set(),
    "nvmlib.progress": set(),
    "nvmlib.backends": {"nvmlib.errors"},
    "nvmlib.posterior": {"nvmlib.errors", "nvmlib.backends"},
    "nvmlib.nn": {"nvmlib.errors", "nvmlib.backends", "nvmlib.posterior"},
}


def _floor(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_each_floor_imports_only_the_floors_below_it():
    """posterior/ imports the backends and errors only; nn/ adds the posterior; neither imports the
    workbook (nvmlib.paper), the dask module or the training-loop callbacks."""
    inside, _ = _graph()
    wrong = sorted(
        (m, t)
        for m, targets in inside.items()
        if _floor(m) in FLOORS
        for t in targets
        if _floor(t) != _floor(m) and _floor(t) not in FLOORS[_floor(m)]
    )
    assert not wrong, wrong


def test_only_the_workbook_imports_the_workbook():
    inside, _ = _graph()
    users = sorted(
        m
        for m, targets in inside.items()
        if not m.startswith("nvmlib.paper") and any(t.startswith("nvmlib.paper") for t in targets)
    )
    assert not users, users


def test_no_module_reaches_into_another_objects_private_members():
    """No `x._name` where `_name` is not a member the same file's classes define (their own
    instances: `post._count` inside SWAGPosterior) and x is not a module imported there (a
    library's own API, e.g. os._exit); dunder names are fine."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        own = {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id == "self"
        }
        own |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        modules = {
            (a.asname or a.name).split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                continue
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in modules):
                continue
            if node.attr in own:
                continue
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not found, found
