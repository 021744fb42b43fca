"""docker-compose.yml, its plaintext override and the Dockerfile agree with the real CLIs.

No Docker engine here: every service command and healthcheck is parsed by the same argparse
parser the console script uses (a renamed flag breaks this test, not a `docker compose up`), and
the init service's `fedserver certs` really runs, into one folder per named volume, so the
certificate files each service uses are the ones it writes, and what each service can read is
what its volumes hold. tests/test_compose_topology.py runs the same topology as processes,
tests/test_docker_e2e.py under Docker.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedclient.partition import Partition
from fedserver import cli as server_cli
from fedserver.security.certs import OPERATOR_NAME, client_names
from fedserver.transport.server import SERVICE_NAME
from tests.compose_files import (
    CLIENTS,
    COMPOSE,
    COORDINATOR,
    INIT,
    PLAINTEXT,
    REPO,
    Containers,
    command,
    healthcheck,
    load,
    local_init,
    mounts,
    networks,
    parse,
)

DOCKERFILE = REPO / "Dockerfile"
TLS_FLAGS = ("tls_cert", "tls_key", "tls_ca")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def init_args(services: dict[str, dict[str, Any]]) -> argparse.Namespace:
    return parse(command(services[INIT]), INIT)


@pytest.fixture(scope="module")
def server_args(services: dict[str, dict[str, Any]]) -> argparse.Namespace:
    return parse(command(services[COORDINATOR]), COORDINATOR)


@pytest.fixture(scope="module")
def client_args(services: dict[str, dict[str, Any]]) -> dict[str, argparse.Namespace]:
    clients = {n: s for n, s in services.items() if command(s)[0] == "fedclient"}
    assert sorted(clients) == sorted(CLIENTS)
    return {name: parse(command(s), name) for name, s in clients.items()}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def containers(
    services: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Containers:
    """Every service's volumes after the init service's real `fedserver certs` has run."""
    made = Containers(tmp_path_factory.mktemp("compose"), services)
    argv = made.localize(INIT, local_init(command(services[INIT])))
    assert server_cli.main(argv[1:]) == 0
    return made


def _files(containers: Containers, service: str, *paths: Path | str) -> None:
    for path in paths:
        assert containers.path(service, str(path)).is_file(), f"{service} has no {path}"


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


# ---------------------------------------------------------------- docker-compose.yml


def test_init_coordinator_and_three_clients(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {INIT, COORDINATOR, *CLIENTS}


def test_every_service_runs_the_one_image(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name, service in services.items():
        build = service.get("build")
        context = build.get("context", ".") if isinstance(build, dict) else build
        assert context is not None, f"{name} is not built from the repo's Dockerfile"
        assert (REPO / context).resolve() == REPO, f"{name} builds from {context!r}, not '.'"
        images.add(service.get("image"))
    assert len(images) == 1 and None not in images, f"services use images {images}"


def test_commands_are_console_scripts(
    services: dict[str, dict[str, Any]],
    init_args: argparse.Namespace,
    server_args: argparse.Namespace,
    client_args: dict[str, argparse.Namespace],
) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, service in services.items():
        assert command(service)[0] in scripts, f"{name} runs something pyproject does not install"
    assert (init_args.command, server_args.command) == ("certs", "run")
    assert all(args.command == "run" for args in client_args.values())


def test_init_service_runs_once_before_everything(services: dict[str, dict[str, Any]]) -> None:
    assert services[INIT].get("restart", "no") == "no"
    for name in (COORDINATOR, *CLIENTS):
        depends = services[name]["depends_on"]
        assert depends[INIT]["condition"] == "service_completed_successfully", name


def test_mtls_is_on_by_default_with_the_generated_files(
    services: dict[str, dict[str, Any]],
    containers: Containers,
    init_args: argparse.Namespace,
    server_args: argparse.Namespace,
    client_args: dict[str, argparse.Namespace],
) -> None:
    assert mounts(services[INIT])[init_args.out.as_posix()][:2] == ("volume", "fedgrpc-certs")
    # The coordinator requires client certificates (--tls-ca) and uses the server pair.
    assert all(getattr(server_args, f) is not None for f in TLS_FLAGS), "mTLS must be on"
    assert (server_args.tls_cert.name, server_args.tls_key.name) == ("server.crt", "server.key")
    _files(containers, COORDINATOR, server_args.tls_cert, server_args.tls_key, server_args.tls_ca)
    for name, args in client_args.items():
        # Each client presents its own certificate, named like its --client-id.
        assert args.client_id in client_names(init_args.clients, init_args.client_prefix)
        assert args.tls_cert.name == f"{args.client_id}.crt", name
        assert args.tls_key.name == f"{args.client_id}.key", name
        _files(containers, name, args.tls_cert, args.tls_key, args.tls_ca)
        assert args.token is None
    # Whatever `certs` wrote is read-only for everyone else.
    for name in (COORDINATOR, *CLIENTS):
        for target, (kind, _source, read_only) in mounts(services[name]).items():
            assert kind == "volume", f"{name}: {target} is a {kind} mount"
            assert read_only or target == server_args.state_dir.as_posix(), (name, target)


def test_each_client_mounts_only_ca_crt_and_its_own_pair(
    services: dict[str, dict[str, Any]],
    containers: Containers,
    client_args: dict[str, argparse.Namespace],
) -> None:
    """ca.key, server.key, operator.key or another client's key would let a client be anyone."""
    for name, args in client_args.items():
        own = {"ca.crt", f"{args.client_id}.crt", f"{args.client_id}.key"}
        assert containers.visible_files(name) == own, name
        # ...and stays so: no service but `certs` mounts a client's volumes.
        for _target, (_kind, volume, _ro) in mounts(services[name]).items():
            sharing = {
                other
                for other, service in services.items()
                if volume in {v for _k, v, _r in mounts(service).values()}
            }
            assert sharing == {name, INIT}, f"{name} shares {volume} with {sharing - {name}}"


def test_the_ca_key_stays_in_the_certs_service(
    services: dict[str, dict[str, Any]], containers: Containers
) -> None:
    holders = {name for name in services if "ca.key" in containers.visible_files(name)}
    assert holders == {INIT}
    # The coordinator holds its own pair and, for its healthcheck, the operator's; no client's.
    seen = containers.visible_files(COORDINATOR)
    assert {f for f in seen if f.endswith(".key")} == {"server.key", f"{OPERATOR_NAME}.key"}


def test_the_bundles_belong_to_the_images_user(
    services: dict[str, dict[str, Any]], init_args: argparse.Namespace
) -> None:
    """`certs` runs as root to write into fresh volumes and hands them to the image's user."""
    assert services[INIT].get("user") in ("root", "0", "0:0")
    useradd = next(r for r in _instructions("RUN") if "useradd" in r)
    uid = re.search(r"useradd [^&]*--uid (\d+)", useradd)
    gid = re.search(r"groupadd [^&]*--gid (\d+)", useradd)
    assert uid and gid, "the Dockerfile must create its user with a fixed uid and gid"
    assert init_args.owner == f"{uid[1]}:{gid[1]}"
    for name in (COORDINATOR, *CLIENTS):
        assert services[name].get("user") in (None, "fed"), f"{name} must not run as root"


def test_certificate_names_cover_how_the_coordinator_is_reached(
    services: dict[str, dict[str, Any]],
    init_args: argparse.Namespace,
    client_args: dict[str, argparse.Namespace],
) -> None:
    probe = parse(healthcheck(services[COORDINATOR]), "coordinator healthcheck")
    used = {a.server.rpartition(":")[0] for a in client_args.values()}
    used.add(probe.server.rpartition(":")[0])
    assert used <= set(init_args.server_name), f"{used - set(init_args.server_name)} not in SANs"


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


def test_clients_share_only_an_internal_network_with_the_coordinator(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = compose.get("networks") or {}
    coordinator = networks(services[COORDINATOR])
    for name in CLIENTS:
        joined = networks(services[name])
        assert joined, f"{name} is on no network"
        for net in joined:
            assert net in coordinator, f"{name} is on {net}, where the coordinator is not"
            # No gateway: a client reaches its own subnet and nothing else, so no route leads
            # to the coordinator's other addresses (its /metrics) or off the host.
            assert (declared.get(net) or {}).get("internal") is True, f"{net} is not internal"
    assert services[INIT].get("network_mode") == "none", "certs needs no network"


def test_metrics_are_served_off_the_clients_network(
    compose: dict[str, Any],
    services: dict[str, dict[str, Any]],
    server_args: argparse.Namespace,
) -> None:
    """/metrics is plaintext and unauthenticated: it binds to an address of the coordinator's on
    a network no client joins (an alias Docker's DNS resolves there only), never 0.0.0.0, and
    that network is where the host's published ports arrive."""
    assert server_args.metrics_port, "the coordinator serves no metrics"
    host = server_args.metrics_host
    assert host not in ("0.0.0.0", "::", ""), f"--metrics-host {host} is every interface"
    coordinator = networks(services[COORDINATOR])
    carrying = [n for n, cfg in coordinator.items() if host in (cfg.get("aliases") or [])]
    assert len(carrying) == 1, f"--metrics-host {host} is no alias of one coordinator network"
    ops = carrying[0]
    assert host not in (COORDINATOR, *services), "a service name resolves on every network"
    for name, service in services.items():
        if name != COORDINATOR:
            assert ops not in networks(service), f"{name} joins {ops}, where /metrics is"
    # The ports reach the coordinator through the one network that has a gateway: ops.
    assert not (compose["networks"].get(ops) or {}).get("internal")
    published = [str(p) for p in services[COORDINATOR]["ports"]]
    metrics = [p for p in published if p.endswith(f":{server_args.metrics_port}")]
    assert metrics and all(p.startswith("127.0.0.1:") for p in metrics), published
    merged = load(COMPOSE, PLAINTEXT)["services"][COORDINATOR]
    assert parse(command(merged), "plaintext coordinator").metrics_host == host


def test_clients_wait_for_a_healthy_coordinator(services: dict[str, dict[str, Any]]) -> None:
    for name in CLIENTS:
        depends = services[name]["depends_on"]
        assert depends[COORDINATOR]["condition"] == "service_healthy"
        # A client exits 0 when training is over; restarting it then would rejoin forever.
        assert services[name].get("restart", "no") in ("no", "on-failure")


def test_state_dir_is_a_named_volume(
    compose: dict[str, Any],
    services: dict[str, dict[str, Any]],
    server_args: argparse.Namespace,
) -> None:
    state_dir = server_args.state_dir.as_posix()
    assert state_dir.startswith("/"), "--state-dir must be an absolute path in the container"
    kind, source, read_only = mounts(services[COORDINATOR])[state_dir]
    assert kind == "volume" and not read_only, f"{state_dir} is a {kind} mount"
    assert source in (compose.get("volumes") or {}), f"volume {source!r} is not declared"
    assert "fedgrpc-certs" in compose["volumes"]
    # Restarted after a crash (it resumes from the volume), but a finished run stays down.
    assert services[COORDINATOR].get("restart") in ("on-failure", "unless-stopped")


def test_healthcheck_is_a_grpc_health_check_over_mtls(
    services: dict[str, dict[str, Any]],
    containers: Containers,
    server_args: argparse.Namespace,
) -> None:
    check = services[COORDINATOR]["healthcheck"]
    assert not check.get("disable", False)
    probe = parse(healthcheck(services[COORDINATOR]), "coordinator healthcheck")
    assert probe.command == "health" and probe.service == SERVICE_NAME
    assert probe.server == f"127.0.0.1:{server_args.port}"
    assert probe.tls_cert.name == f"{OPERATOR_NAME}.crt"
    assert probe.tls_key.name == f"{OPERATOR_NAME}.key"
    _files(containers, COORDINATOR, probe.tls_cert, probe.tls_key, probe.tls_ca)


def test_plaintext_is_an_explicit_override() -> None:
    merged = load(COMPOSE, PLAINTEXT)["services"]
    assert set(merged) == set(load(COMPOSE)["services"]), "the override adds no services"
    server = parse(command(merged[COORDINATOR]), "plaintext coordinator")
    probe = parse(healthcheck(merged[COORDINATOR]), "plaintext healthcheck")
    secure = parse(command(load(COMPOSE)["services"][COORDINATOR]), COORDINATOR)
    for flag in TLS_FLAGS:
        assert getattr(server, flag) is None and getattr(probe, flag) is None
    for name in CLIENTS:
        args = parse(command(merged[name]), f"plaintext {name}")
        assert all(getattr(args, f) is None for f in TLS_FLAGS), name
        assert args.server == f"{COORDINATOR}:{server.port}"
    # Everything but security stays as in the secure file.
    drop = {*TLS_FLAGS, "tokens"}
    assert {k: v for k, v in vars(server).items() if k not in drop} == {
        k: v for k, v in vars(secure).items() if k not in drop
    }
    assert "PLAINTEXT" in PLAINTEXT.read_text() and "debugging only" in PLAINTEXT.read_text()


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_the_pinned_cpu_torch() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    torch_runs = [r for r in _instructions("RUN") if re.search(r"\btorch==", r)]
    assert len(torch_runs) == 1, "the Dockerfile must install torch explicitly, once"
    run = torch_runs[0]
    # From a CPU wheel in the build context when there is one, else from PyTorch's CPU index.
    assert f"torch=={pins['torch']}" in shlex.split(run)
    assert f"torch=={pins['torch']}+cpu" in run and "--find-links /tmp/wheels" in run
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    assert '--index-url "$TORCH_INDEX_URL"' in run


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


def test_dockerfile_base_is_a_build_arg(services: dict[str, dict[str, Any]]) -> None:
    """python:3.11-slim by default; `make docker-e2e` swaps in a stand-in where it can't pull."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.M)
    for name, service in services.items():
        arg = service["build"]["args"]["BASE_IMAGE"]
        assert arg == "${FEDGRPC_BASE_IMAGE:-python:3.11-slim}", name


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = _instructions("USER")
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert not _instructions("ENTRYPOINT"), "an ENTRYPOINT would hide the fedserver/fedclient CLIs"


def test_dockerfile_copies_what_pip_install_needs() -> None:
    sources = []
    for copy in _instructions("COPY") + _instructions("ADD"):
        if "--from=" in copy:
            continue  # from an earlier build stage, not from the repo
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
    _owned_by_the_user(server_args.state_dir.as_posix())


def test_dockerfile_prepares_the_certs_volume(init_args: argparse.Namespace) -> None:
    _owned_by_the_user(init_args.out.as_posix())
    # A VOLUME would hand every container, clients included, anonymous volumes of its own.
    assert not _instructions("VOLUME"), "compose names the volumes; the image declares none"


def _owned_by_the_user(path: str) -> None:
    """A fresh named volume mounted there starts out owned by the image's user."""
    runs = " ".join(_instructions("RUN"))
    assert re.search(rf"mkdir -p [^&]*{path}\b", runs), f"the image does not make {path}"
    assert re.search(rf"chown fed:fed [^&]*{path}\b", runs), f"{path} is not fed's"
