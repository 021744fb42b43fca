"""The import graph of fedcore, fedserver and fedclient has no cycles and points one way.

Every `import` counts, including those inside functions (a lazy import is still a dependency
a reader has to follow) and `from package import module`. Imports under `if TYPE_CHECKING:`
count too: a type-only back-reference is how the old mode objects reached into the Coordinator.
Direction (docs/architecture.md): protos -> fedcore <- fedserver / fedclient; the round state
machine and the strategies never import gRPC.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedcore", "fedserver", "fedclient")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto" in path.relative_to(ROOT).parts[1:2]:
                continue  # generated stubs
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `name` imports (all of them, not only ours)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            out.add(target)
            for alias in node.names:  # `from package import module`
                if f"{target}.{alias.name}" in modules:
                    out.add(f"{target}.{alias.name}")
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _ours(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between our own modules; importing a package's module also runs the package."""
    ours: dict[str, set[str]] = {}
    for name, targets in graph.items():
        edges = set()
        for t in targets:
            if t in graph and t != name:
                edges.add(t)
        ours[name] = edges
    return ours


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_function_level_and_module_imports() -> None:
    graph = _graph()
    assert "fedserver.coordinator" in graph and "fedcore.codecs" in graph
    assert "fedcore.tensors" in graph["fedcore.codecs"]
    assert "fedcore.secagg.quantize" in graph["fedserver.protocols.secagg"]  # from pkg import mod


def test_no_import_cycles() -> None:
    cycles = _cycles(_ours(_graph()))
    shown = "\n".join(" <-> ".join(c) for c in cycles)
    assert not cycles, f"import cycles:\n{shown}"


def test_dependencies_point_one_way() -> None:
    graph = _graph()
    wrong = []
    for name, targets in sorted(graph.items()):
        top = name.split(".")[0]
        for t in sorted(targets):
            other = t.split(".")[0]
            if top == "fedcore" and other in ("fedserver", "fedclient"):
                wrong.append(f"{name} -> {t}")
            # The simulation runs both sides in one program: its package is the one place
            # where fedserver may use the client's code (docs/architecture.md).
            if {top, other} == {"fedserver", "fedclient"} and not name.startswith(
                "fedserver.simulation."
            ):
                wrong.append(f"{name} -> {t}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_round_machine_and_strategies_stay_free_of_grpc() -> None:
    graph = _graph()
    pure = [
        n
        for n in graph
        if n == "fedserver.rounds"
        or n.startswith("fedserver.strategies")
        or n.startswith("fedserver.protocols")
    ]
    assert "fedserver.rounds" in pure and len(pure) > 3
    offenders = [f"{n} -> {t}" for n in sorted(pure) for t in graph[n] if t.split(".")[0] == "grpc"]
    assert not offenders, "gRPC imported by pure modules:\n" + "\n".join(offenders)
