"""Imports only go down: no module of failproxy imports, even under TYPE_CHECKING or inside a
function, a module that imports it back. A lower module that must call up declares what it
needs as a typing.Protocol instead (upstream.ResponseSink, exchange.Downstream, ...).

The same holds between the sub-packages, bottom to top: the leaves at the top of the package
(config, errors, reasons, tls), telemetry, routing, then discovery and proxy side by side,
process, and the command line (cli) over all of them, beside it the profile-guided build's
training load (_pgo), which drives the whole proxy as a command does; the demo stands apart.

The benchmark harness is layered the same way, bottom to top: bench/instruments, targets,
scenarios, profiles, then its top (runner, report, __main__); bench may import failproxy, failproxy
never imports bench.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "failproxy"

# What each sub-package may import besides itself and the leaves.
ALLOWED: dict[str, set[str]] = {
    "telemetry": set(),
    "routing": {"telemetry"},
    "discovery": {"telemetry", "routing"},
    "proxy": {"telemetry", "routing"},
    "process": {"telemetry", "routing", "discovery", "proxy"},
    "demo": set(),
}
LEAVES = {"_build", "config", "errors", "reasons", "tls"}
TOP = {"__init__", "__main__", "cli", "_pgo"}  # may import anything


def _module_of(dotted: str) -> str | None:
    """`failproxy.proxy.exchange` -> "proxy.exchange" when that is a module of the package."""
    parts = dotted.split(".")
    if parts[0] != "failproxy" or len(parts) < 2:
        return None
    if PACKAGE.joinpath(*parts[1:]).with_suffix(".py").exists():
        return ".".join(parts[1:])
    return None


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
            module = _module_of(name)
            if module is not None:
                out.add(module)
    return out


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def import_graph() -> dict[str, set[str]]:
    graph = {_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
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
    layers = ["routing.peer", "proxy.connect", "proxy.responseparser", "proxy.upstream",
              "proxy.request", "proxy.requestparser",
              "proxy.events", "proxy.context", "proxy.exchange", "proxy.downstream",
              "process.worker"]
    graph = import_graph()
    for i, module in enumerate(layers):
        above = set(layers[i + 1:])
        assert not graph[module] & above, f"{module} imports {graph[module] & above}"


def _package(module: str) -> str:
    return module.split(".")[0] if "." in module else ""


def test_packages_import_only_down() -> None:
    graph = import_graph()
    assert {_package(m) for m in graph} == {"", *ALLOWED}, "a sub-package missing from ALLOWED"
    for module, deps in sorted(graph.items()):
        package = _package(module)
        for dep in deps:
            if package == "":
                ok = module in TOP or dep in LEAVES
            else:
                ok = dep in LEAVES or _package(dep) in ALLOWED[package] | {package}
            assert ok, f"{module} imports {dep}: against the layers (ALLOWED)"


def test_the_package_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk itself reads a from-package import as the module it names."""
    assert _module_of("failproxy.proxy.exchange") == "proxy.exchange"
    assert _module_of("failproxy.proxy") is None  # a package, not a module
    assert _module_of("failproxy.config") == "config"
    source = tmp_path / "m.py"
    source.write_text("from failproxy.proxy import exchange\nimport failproxy.routing.peer\n")
    assert _imports(source) == {"proxy.exchange", "routing.peer"}


# ---------------------------------------------------------------- the benchmark harness

BENCH = PACKAGE.parent / "bench"
# bench's sub-packages, bottom to top; each imports only those below it (bench may import
# failproxy, never the reverse). The top of bench (runner, report, __main__) may import any of
# them; bench/sim is a model of its own.
BENCH_LAYERS = ["instruments", "targets", "scenarios", "profiles"]


def _imported_names(path: Path) -> set[str]:
    """Every dotted name `path` imports, anywhere in the file (`from a.b import c`: a.b, a.b.c)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _bench_imports(path: Path) -> set[str]:
    """The bench modules and sub-packages `path` imports: "scenarios.seed", "profiles", "report"."""
    out: set[str] = set()
    for name in _imported_names(path):
        parts = name.split(".")
        if parts[0] == "bench" and len(parts) > 1:
            out.add(".".join(parts[1:3]) if parts[1] in BENCH_LAYERS else parts[1])
    return out


def _bench_package(module: str) -> str:
    """"scenarios.seed" -> "scenarios"; the top of bench ("runner", "report") -> ""."""
    package = module.split(".")[0]
    return package if package in BENCH_LAYERS else ""


def _bench_layer(module: str) -> int:
    package = _bench_package(module)
    return BENCH_LAYERS.index(package) if package else len(BENCH_LAYERS)


def test_bench_imports_only_down() -> None:
    modules = [p for p in BENCH.rglob("*.py") if "sim" not in p.relative_to(BENCH).parts]
    packages = {p.parent.name for p in modules if p.parent != BENCH}
    assert packages == set(BENCH_LAYERS), "a bench sub-package missing from BENCH_LAYERS"
    for path in modules:
        module = ".".join(path.relative_to(BENCH).with_suffix("").parts)
        for dep in _bench_imports(path):
            ok = (_bench_layer(dep) < _bench_layer(module)
                  or _bench_package(dep) == _bench_package(module))
            assert ok, f"bench.{module} imports bench.{dep}: against bench's layers"


def test_failproxy_never_imports_bench() -> None:
    for path in PACKAGE.rglob("*.py"):
        names = {name.split(".")[0] for name in _imported_names(path)}
        assert "bench" not in names, f"{path.relative_to(PACKAGE.parent)} imports bench"


def test_the_bench_check_reads_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from bench.scenarios import seed\nfrom bench import report\n"
                      "import bench.instruments.stats\n")
    assert _bench_imports(source) == {"scenarios", "scenarios.seed", "report",
                                      "instruments.stats"}
    order = ["instruments.stats", "targets.servers", "scenarios.seed", "profiles.micro", "runner"]
    assert [_bench_layer(m) for m in order] == sorted(_bench_layer(m) for m in order)
    assert len({_bench_layer(m) for m in order}) == len(order)
