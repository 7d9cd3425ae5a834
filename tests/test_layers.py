"""The package's layers import one way (docs/architecture.md), and ``import tinysubspace`` stays
light: the core never pulls in pandas, matplotlib, configs or the run store."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tinysubspace as ts

PACKAGE = Path(ts.__file__).parent

# Each layer and the layers it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "operator": set(),
    "curvature": {"operator"},
    "linalg": {"operator"},
    "metrics": set(),
    "optim": {"operator", "curvature", "linalg", "metrics"},
    "problems": {"operator", "curvature", "linalg", "metrics"},
    "results": {"linalg"},
    "runtime": {"curvature"},
    "experiments": {"operator", "curvature", "linalg", "metrics", "optim", "problems", "results",
                    "runtime"},
    "integrations": {"operator", "curvature", "linalg", "metrics", "optim", "problems", "results",
                     "runtime", "experiments"},
    "plots": {"results", "linalg", "metrics", "problems"},
    "cli": {"operator", "curvature", "linalg", "metrics", "optim", "problems", "results",
            "runtime", "experiments", "plots", "integrations"},
}
CORE_LAYERS = ("operator", "curvature", "linalg", "metrics")
HEAVY = ("pandas", "matplotlib")


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["tinysubspace", *parts])


def _imported_layers(path: Path) -> set[str]:
    """Top-level layers of every ``tinysubspace.*`` import in ``path`` (lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tinysubspace" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
                break
    return found


LAYER_FILES = [p for p in sorted(PACKAGE.rglob("*.py"))
               if p.relative_to(PACKAGE).parts[0].removesuffix(".py") in ALLOWED]


@pytest.mark.parametrize("path", LAYER_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_layer_imports_a_higher_one(path):
    layer = _layer(path).removesuffix(".py") if path.parent == PACKAGE else _layer(path)
    upward = _imported_layers(path) - ALLOWED[layer] - {layer}
    assert not upward, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(upward)}"


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The check above can fail: a core file importing the run store is flagged."""
    bad = PACKAGE / "curvature" / "_probe_upward.py"
    bad.write_text("from tinysubspace.results.store import Run\n")
    try:
        assert _imported_layers(bad) - ALLOWED["curvature"] == {"results"}
    finally:
        bad.unlink()


def _fresh_import(module: str) -> list[str]:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return [m for m in out.stdout.strip().split(",") if m]


CORE_MODULES = sorted({_module(p) for p in LAYER_FILES
                       if p.relative_to(PACKAGE).parts[0].removesuffix(".py") in CORE_LAYERS})


# each core module in a fresh interpreter costs a torch import: the package itself is in the quick
# tier, the modules one by one in the slow one
@pytest.mark.parametrize("module", ["tinysubspace", *(pytest.param(m, marks=pytest.mark.slow)
                                                     for m in CORE_MODULES)])
def test_core_modules_leave_pandas_and_matplotlib_out(module):
    assert _fresh_import(module) == []


def test_the_lazy_names_are_there_and_load_their_layer():
    """Every public name is reachable as ``ts.NAME``; asking for the run store imports pandas."""
    for name in ts.__all__:
        assert getattr(ts, name) is not None, name
    assert _fresh_import("tinysubspace.results.store") == ["pandas"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        _ = ts.no_such_thing


def test_no_import_circle():
    """Module-level imports between tinysubspace modules form no cycle."""
    graph: dict[str, set[str]] = {}
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        edges = set()
        for node in ast.parse(path.read_text()).body:  # module level only: not lazy imports
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks are not imports at run time
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for target in [f"{node.module}.{a.name}" for a in node.names] + [node.module]:
                    if target in modules and target != name:
                        edges.add(target)
                        break
        graph[name] = edges
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                raise AssertionError(" -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_module_is_much_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
