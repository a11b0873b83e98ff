"""The package's shape: every module imports alone, and no two modules import each other.

Imports are read from the source (any level: a function-level import is an edge
too, since it runs; only ``if TYPE_CHECKING:`` blocks are left out). An edge goes
to the module named, not to the packages above it.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "agent"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {
    _module_name(p): p
    for p in sorted(PACKAGE.rglob("*.py"))
    if "bootstrap" not in p.parts  # a sitecustomize.py, not a module of the package
}


#: Parsed when the tests are collected, before any test starts a thread: on Python 3.11
#: the AST constructor's depth count is shared, and a thread parsing meanwhile (3.11's
#: traceback module does, to print a server thread's error) can make ``ast.parse`` raise
#: "AST constructor recursion depth mismatch" (python/cpython#106905).
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if (
                isinstance(child, ast.If)
                and isinstance(child.test, ast.Name)
                and child.test.id == "TYPE_CHECKING"
            ):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str) -> set[str]:
    """The modules of ``agent`` that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for named in targets:
            target = named
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_the_import_graph_is_read():
    """A check that finds nothing proves nothing: known edges must be seen."""
    assert "agent._log" in imports_of("agent")
    assert "agent._log" in imports_of("agent.config")


def test_no_import_cycle_inside_the_package():
    graph = {name: imports_of(name) for name in MODULES}
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for name in sorted(graph):
        if name not in index:
            connect(name)
    details = [", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) for c in sorted(cycles)]
    assert not cycles, "import cycles:\n" + "\n".join(details)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_alone_in_a_fresh_interpreter(name):
    result = subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "TALISKER_ENABLED": "false"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_map_in_the_design_doc_matches_the_tree():
    import re

    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("## The map", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    named_files = set(re.findall(r"([\w/]+\.py)\b", block))
    named_dirs = set(re.findall(r"\b(\w+)/", block))
    files = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    for path in files:
        if path.name != "__init__.py":
            assert path.name in {n.rsplit("/", 1)[-1] for n in named_files}, path
        for part in path.relative_to(PACKAGE).parts[:-1]:
            assert part in named_dirs, path
    basenames = {p.name for p in files}
    for name in named_files:
        assert name.rsplit("/", 1)[-1] in basenames, f"the map names {name}, not in the tree"
