"""docker-compose.yml and the Dockerfile agree with the real CLIs and the repo (no Docker needed).

Every service command is parsed by the same argparse parser the console script uses, so a flag
renamed in the CLI breaks this test instead of a `docker compose up`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedclient import cli as client_cli
from fedclient.partition import Partition
from fedserver import cli as server_cli
from fedserver.server import SERVICE_NAME

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
COORDINATOR = "coordinator"
CLIENTS = ("client-0", "client-1", "client-2")
PARSERS = {"fedserver": server_cli.build_parser, "fedclient": client_cli.build_parser}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _parse(name: str, service: dict[str, Any]) -> argparse.Namespace:
    argv = _argv(service)
    assert argv[0] in PARSERS, f"{name}: command must start with one of {sorted(PARSERS)}"
    try:
        return PARSERS[argv[0]]().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{name}: {argv[0]} rejects {shlex.join(argv[1:])!r}")


@pytest.fixture(scope="module")
def server_args(services: dict[str, dict[str, Any]]) -> argparse.Namespace:
    assert _argv(services[COORDINATOR])[0] == "fedserver"
    return _parse(COORDINATOR, services[COORDINATOR])


@pytest.fixture(scope="module")
def client_args(services: dict[str, dict[str, Any]]) -> dict[str, argparse.Namespace]:
    clients = {n: s for n, s in services.items() if _argv(s)[0] == "fedclient"}
    assert sorted(clients) == sorted(CLIENTS)
    return {name: _parse(name, s) for name, s in clients.items()}


def _healthcheck_code(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        argv = shlex.split(test)
    elif test[0] == "CMD-SHELL":
        argv = shlex.split(test[1])
    else:
        assert test[0] == "CMD", f"unexpected healthcheck form {test[0]!r}"
        argv = [str(a) for a in test[1:]]
    assert argv[0].startswith("python"), "the healthcheck runs a python one-liner"
    return argv[argv.index("-c") + 1]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    out = []
    for text in logical:
        instruction, _, rest = text.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def _instructions(name: str) -> list[str]:
    return [rest for instruction, rest in _dockerfile() if instruction == name]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------- docker-compose.yml


def test_the_four_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {COORDINATOR, *CLIENTS} <= services.keys()


def test_every_service_runs_the_one_image(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name, service in services.items():
        build = service.get("build")
        context = build.get("context", ".") if isinstance(build, dict) else build
        assert context is not None, f"{name} is not built from the repo's Dockerfile"
        assert (REPO / context).resolve() == REPO, f"{name} builds from {context!r}, not '.'"
        if isinstance(build, dict):
            assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        images.add(service.get("image"))
    assert DOCKERFILE.is_file()
    assert len(images) == 1 and None not in images, f"services use images {images}"


def test_commands_are_console_scripts_with_subcommand_run(
    services: dict[str, dict[str, Any]],
    server_args: argparse.Namespace,
    client_args: dict[str, argparse.Namespace],
) -> None:
    scripts = _pyproject()["project"]["scripts"]
    for name, service in services.items():
        assert _argv(service)[0] in scripts, f"{name} runs something pyproject does not install"
    assert server_args.command == "run"
    assert all(args.command == "run" for args in client_args.values())


def test_partitions_are_distinct_and_cover_min_clients(
    server_args: argparse.Namespace, client_args: dict[str, argparse.Namespace]
) -> None:
    parts = [
        Partition.parse(a.partition, scheme=a.partitioner, alpha=a.alpha, seed=a.seed)
        for a in client_args.values()
    ]
    n = server_args.min_clients
    assert {p.count for p in parts} == {n}, "every client must split the data into N slices"
    assert sorted(p.index for p in parts) == list(range(n))
    # Each client computes the whole split locally: different schemes or seeds would overlap.
    assert len({(p.scheme, p.alpha, p.seed) for p in parts}) == 1
    ids = [a.client_id for a in client_args.values()]
    assert all(ids) and len(set(ids)) == len(ids), f"client ids must be set and unique: {ids}"


def test_clients_reach_the_coordinator(
    server_args: argparse.Namespace, client_args: dict[str, argparse.Namespace]
) -> None:
    assert server_args.host == "0.0.0.0", "the coordinator must listen beyond its own loopback"
    for name, args in client_args.items():
        host, _, port = args.server.rpartition(":")
        assert host == COORDINATOR, f"{name} talks to {host!r}"
        assert int(port) == server_args.port, f"{name} uses port {port}"
        assert args.task == server_args.task, f"{name} trains a different task"


def test_clients_wait_for_a_healthy_coordinator(services: dict[str, dict[str, Any]]) -> None:
    for name in CLIENTS:
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form"
        assert depends[COORDINATOR]["condition"] == "service_healthy"
        # A client exits 0 when training is over; restarting it then would rejoin forever.
        assert services[name].get("restart", "no") in ("no", "on-failure")


def test_state_dir_is_a_named_volume(
    compose: dict[str, Any],
    services: dict[str, dict[str, Any]],
    server_args: argparse.Namespace,
) -> None:
    mounts = {}
    for volume in services[COORDINATOR]["volumes"]:
        if isinstance(volume, dict):
            mounts[volume["target"]] = (volume.get("type", "volume"), volume.get("source"))
        else:
            source, target = volume.split(":")[:2]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            mounts[target] = (kind, source)
    state_dir = server_args.state_dir.as_posix()
    assert state_dir.startswith("/"), "--state-dir must be an absolute path in the container"
    kind, source = mounts[state_dir]
    assert kind == "volume", f"{state_dir} is a {kind} mount, not a named volume"
    assert source in (compose.get("volumes") or {}), f"volume {source!r} is not declared"


def test_coordinator_healthcheck_is_defined(
    services: dict[str, dict[str, Any]], server_args: argparse.Namespace
) -> None:
    check = services[COORDINATOR]["healthcheck"]
    assert not check.get("disable", False)
    code = _healthcheck_code(services[COORDINATOR])
    assert "grpc_health.v1" in code
    assert re.findall(r"127\.0\.0\.1:(\d+)", code) == [str(server_args.port)]


@pytest.mark.parametrize("status", ["SERVING", "NOT_SERVING"])
def test_coordinator_healthcheck_runs(services: dict[str, dict[str, Any]], status: str) -> None:
    """The one-liner itself, against a real gRPC health service on a free port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set(SERVICE_NAME, getattr(health_pb2.HealthCheckResponse, status))
        code = re.sub(
            r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", _healthcheck_code(services[COORDINATOR])
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
    finally:
        server.stop(None)
    assert (done.returncode == 0) == (status == "SERVING"), done.stderr


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_the_pinned_cpu_torch() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    torch_runs = [r for r in _instructions("RUN") if re.search(r"\btorch==", r)]
    assert torch_runs, "the Dockerfile must install torch explicitly"
    for run in torch_runs:
        assert f"torch=={pins['torch']}" in shlex.split(run)
        assert "https://download.pytorch.org/whl/cpu" in run


def test_dockerfile_pip_installs_use_the_constraints() -> None:
    installs = [
        part
        for run in _instructions("RUN")
        for part in re.split(r"&&|;", run)
        if re.search(r"\bpip install\b", part)
    ]
    assert any(shlex.split(p)[-1] == "." for p in installs), "the project itself is installed"
    for part in installs:
        words = shlex.split(part)
        assert "constraints.txt" in words and words[words.index("constraints.txt") - 1] == "-c", (
            f"pip install without -c constraints.txt: {part.strip()!r}"
        )


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = _instructions("USER")
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert not _instructions("ENTRYPOINT"), "an ENTRYPOINT would hide the fedserver/fedclient CLIs"


def test_dockerfile_copies_what_pip_install_needs() -> None:
    sources = []
    for copy in _instructions("COPY") + _instructions("ADD"):
        words = [w for w in shlex.split(copy) if not w.startswith("--")]
        sources += words[:-1]
    # Every package directory (and file) the Dockerfile copies exists in the repo.
    for source in sources:
        path = REPO / source
        assert path.is_dir() if not path.suffix else path.is_file(), (
            f"Dockerfile copies {source}, which is not in the repo"
        )
    # ...and it copies every package pyproject.toml installs, plus the files the build reads.
    project = _pyproject()
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {Path(s).as_posix().rstrip("/") for s in sources}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert {"pyproject.toml", "constraints.txt", project["project"]["readme"]} <= copied


def test_dockerfile_matches_the_coordinator_service(server_args: argparse.Namespace) -> None:
    exposed = {w.split("/")[0] for e in _instructions("EXPOSE") for w in e.split()}
    assert str(server_args.port) in exposed
    volumes = {w.strip('[]",') for v in _instructions("VOLUME") for w in v.split()}
    assert server_args.state_dir.as_posix() in volumes
