"""Imports only go down: no module of failproxy imports, even under TYPE_CHECKING or inside a
function, a module that imports it back. A lower module that must call up declares what it
needs as a typing.Protocol instead (upstream.ResponseSink, exchange.Downstream, ...)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "failproxy"


def _imports(path: Path) -> set[str]:
    """Every failproxy module `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "failproxy" and len(parts) > 1:
                module = parts[1]
                if (PACKAGE / f"{module}.py").exists():
                    out.add(module)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    for module, deps in graph.items():
        deps.discard(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_check_sees_a_cycle() -> None:
    """The walk itself: a cycle through a TYPE_CHECKING-style edge is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_hot_path_layers() -> None:
    """The hot path's order, bottom to top: each module imports only modules below it."""
    layers = ["peer", "connect", "upstream", "request", "events", "context", "exchange",
              "downstream", "worker"]
    graph = import_graph()
    for i, module in enumerate(layers):
        above = set(layers[i + 1:])
        assert not graph[module] & above, f"{module} imports {graph[module] & above}"
