"""The import graph of fedcore, fedserver and fedclient has no cycles and points one way.

Every `import` counts, including those inside functions (a lazy import is still a dependency
a reader has to follow) and `from package import module`. Imports under `if TYPE_CHECKING:`
count too: a type-only back-reference is how the old mode objects reached into the Coordinator.
Direction (docs/architecture.md): protos -> fedcore <- fedserver / fedclient. Inside fedserver the
folders are floors (FEDSERVER_FLOORS): imports point down; only transport/ and the command line
import gRPC, only simulation/ the client's code (and so torch).
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
    assert "fedserver.coordinator.lifecycle" in graph and "fedcore.codecs" in graph
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


# fedserver's folders from the ground up (docs/architecture.md). A module may import modules of
# its own folder and of the floors below; folders on one floor do not import each other.
# `cli` is the module fedserver/cli.py, the entry point that wires the commands.
FEDSERVER_FLOORS: tuple[tuple[str, ...], ...] = (
    ("rounds", "state", "strategies", "security"),  # pure machines, records, math, identities
    ("updates",),  # an update's way in: receive, verify, spill, fold
    ("protocols",),  # how a round's contributions become its aggregate
    ("modes",),  # how rounds run: machine, protocol, flags and refusals of each --mode
    ("coordinator",),  # the round lifecycle around one protocol
    ("transport",),  # gRPC
    ("commands",),  # the subcommands
    ("simulation",),  # `fedserver simulate`: runs both sides in one program
    ("cli",),
)
FLOOR = {folder: n for n, folders in enumerate(FEDSERVER_FLOORS) for folder in folders}
# Who may import these, inside fedserver (the folders, or `cli`).
ALLOWED = {
    "grpc": {"transport", "commands", "cli"},
    "torch": {"simulation"},  # only through the client's code, which needs it
    "fedclient": {"simulation"},
}


def _folder(name: str) -> str | None:
    """The fedserver folder (or `cli`) a module is in; None for the package itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_fedserver_module_sits_on_a_floor() -> None:
    """A new module goes into the folder of its layer, not next to them."""
    graph = _graph()
    homeless = [n for n in sorted(graph) if n.startswith("fedserver.") and _folder(n) not in FLOOR]
    assert not homeless, "fedserver modules outside the layer folders:\n" + "\n".join(homeless)


def test_fedserver_folders_point_down() -> None:
    graph = _graph()
    wrong = []
    for name, targets in sorted(graph.items()):
        here = _folder(name) if name.startswith("fedserver.") else None
        if here not in FLOOR:
            continue
        for t in sorted(targets):
            there = _folder(t) if t.startswith("fedserver.") else None
            if there is None or there == here:
                continue
            if there not in FLOOR or FLOOR[there] >= FLOOR[here]:
                wrong.append(f"{name} -> {t}")
    assert not wrong, "fedserver imports that do not point down a floor:\n" + "\n".join(wrong)


def test_round_machine_and_strategies_stay_free_of_grpc() -> None:
    """grpc: transport and the command line; torch and fedclient: the simulation only."""
    graph = _graph()
    pure = [n for n in graph if _folder(n) in {"rounds", "strategies", "protocols"}]
    assert "fedserver.rounds.synchronous" in pure and len(pure) > 3
    offenders = []
    for name, targets in sorted(graph.items()):
        if not name.startswith("fedserver."):
            continue
        for t in sorted(targets):
            top = t.split(".")[0]
            if top in ALLOWED and _folder(name) not in ALLOWED[top]:
                offenders.append(f"{name} -> {t}")
    assert not offenders, "imports of grpc, torch or fedclient out of place:\n" + "\n".join(
        offenders
    )


# Differential privacy is a wrapper around the round protocol (fedserver/protocols/dp.py); the
# coordinator hands it to the protocol registry and knows nothing else of it. Only assembly.py,
# which turns the settings into that wrapper, may name it.
DP_NAMES = ("DPConfig", "DPServer", "DPWrapper", "DifferentialPrivacy", "reclip", "privatize")
DP_MODULES = ("fedserver.protocols.dp", "fedcore.privacy")


def test_the_coordinator_knows_nothing_of_dp_but_handing_it_on() -> None:
    graph, paths = _graph(), _modules()
    coordinator = [n for n in graph if _folder(n) == "coordinator"]
    assert "fedserver.coordinator.lifecycle" in coordinator
    offenders = []
    for name in sorted(coordinator):
        if name == "fedserver.coordinator.assembly":
            continue
        offenders += [f"{name} -> {t}" for t in sorted(graph[name]) if t in DP_MODULES]
        text = paths[name].read_text()
        offenders += [f"{name} names {word}" for word in DP_NAMES if word in text]
    assert not offenders, "DP outside protocols/dp.py:\n" + "\n".join(offenders)


# Underscore names of other objects that transport/ and simulation/ may read: namedtuple's
# public methods (they start with `_` so as not to clash with field names), and argparse's
# action lists, which simulation/cli.py needs to copy `fedserver run`'s flags (argparse has no
# public way to do that).
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make"}
ARGPARSE = {"_action_groups", "_group_actions", "_optionals", "_add_action", "_actions"}
ARGPARSE |= {"_ArgumentGroup", "_SubParsersAction"}  # its types, in annotations
PRIVATE_ALLOWED = {"fedserver.simulation.cli": ARGPARSE}


def _private_reads(path: Path) -> list[tuple[int, str]]:
    """(line, `x._y`) for every `_private` attribute read on something other than self/cls."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        found.append((node.lineno, f"{ast.unparse(node.value)}.{attr}"))
    return found


def test_private_reads_are_seen(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("self._ok\ncls._ok\nc._changed\nself._servicer._header\nx.__class__\n")
    assert _private_reads(sample) == [(3, "c._changed"), (4, "self._servicer._header")]


def test_transports_use_only_the_coordinators_public_face() -> None:
    """transport/ and simulation/ drive the coordinator through coordinator/api.py: neither
    reads a `_private` attribute of another object (the coordinator's `_changed`, `_advance`,
    the servicer's `_header`...): what a transport needs becomes public there."""
    offenders = []
    for name, path in sorted(_modules().items()):
        if _folder(name) not in {"transport", "simulation"}:
            continue
        allowed = PUBLIC_UNDERSCORE | PRIVATE_ALLOWED.get(name, set())
        for line, expr in _private_reads(path):
            if expr.rsplit(".", 1)[1] not in allowed:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {expr}")
    assert len([n for n in _modules() if _folder(n) == "transport"]) > 5
    assert not offenders, "private attributes read across objects:\n" + "\n".join(offenders)


def test_headers_are_protobuf_only() -> None:
    """transport/headers.py, shared by the gRPC servicer and the in-process transport, builds
    and parses messages only: it imports no grpc itself."""
    graph = _graph()
    assert not any(t.split(".")[0] == "grpc" for t in graph["fedserver.transport.headers"])
    users = [n for n, targets in graph.items() if "fedserver.transport.headers" in targets]
    assert {"fedserver.transport.service", "fedserver.simulation.inprocess"} <= set(users)
