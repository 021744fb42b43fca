"""docker-compose.yml's topology as local processes, with the arguments the compose file passes.

init (`fedserver certs`) -> coordinator (mTLS, state volume) -> its healthcheck -> three clients,
then `docker compose restart coordinator` (SIGTERM, start again with the same command) in the
middle of the run, which must resume from the state dir and finish all rounds.

Only what Docker itself provides is substituted: each named volume becomes a folder under tmp
and each service sees only the volumes it mounts (tests/compose_files.Containers), the init
service's bundles go to this user instead of the image's uid, the service name `coordinator`
the container's 0.0.0.0 and the coordinator's `ops` alias for /metrics become 127.0.0.1 (this
machine offers only loopback; tests/test_compose.py checks the networks statically), and ports
become free ones. Every other argument is the compose file's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.security import TlsFiles
from fedserver.state.history import read_status
from tests.compose_files import (
    CLIENTS,
    COMPOSE,
    COORDINATOR,
    INIT,
    Containers,
    command,
    healthcheck,
    load,
    local_init,
    parse,
)
from tests.procs import Proc, child_env, free_port, scrape, spawn, wait_serving, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]
MODULES = {"fedserver": "fedserver.cli", "fedclient": "fedclient.cli"}


class Localizer:
    """Maps a container command onto this machine (see the module docstring)."""

    def __init__(self, tmp: Path, services: dict[str, dict]) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.containers = Containers(tmp, services)

    def __call__(self, service: str, argv: list[str]) -> list[str]:
        flags = {
            "--port": str(self.port),
            "--host": "127.0.0.1",
            "--metrics-port": str(self.metrics_port),
            "--metrics-host": "127.0.0.1",
        }
        out: list[str] = []
        for word in argv:
            if out and out[-1] in flags:
                out.append(flags[out[-1]])
                continue
            host, _, port = word.rpartition(":")
            if host in (COORDINATOR, "127.0.0.1") and port.isdigit():
                word = f"127.0.0.1:{self.port}"
            out.append(word)
        out = self.containers.localize(service, local_init(out) if service == INIT else out)
        return ["-m", MODULES[out[0]], *out[1:]]


def test_compose_topology_runs_as_processes(tmp_path: Path, procs: list[Proc]) -> None:
    services = load(COMPOSE)["services"]
    local = Localizer(tmp_path, services)
    logs = tmp_path / "logs"

    def run(service: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *local(service, argv)], capture_output=True, text=True,
            env=child_env(), timeout=120,
        )  # fmt: skip

    init = run(INIT, command(services[INIT]))
    assert init.returncode == 0, init.stderr
    # The init service runs on every `up`; the second run must keep the CA and certificates.
    again = run(INIT, command(services[INIT]))
    assert again.returncode == 0 and "nothing new" in again.stdout

    server_argv = local(COORDINATOR, command(services[COORDINATOR]))
    server = spawn("coordinator", server_argv, logs)
    procs.append(server)
    probe_argv = parse(healthcheck(services[COORDINATOR]), "coordinator healthcheck")
    operator = TlsFiles(
        *(
            local.containers.path(COORDINATOR, str(path))
            for path in (probe_argv.tls_cert, probe_argv.tls_key, probe_argv.tls_ca)
        )
    )
    wait_serving(local.port, server, tls=operator)
    probe = run(COORDINATOR, healthcheck(services[COORDINATOR]))
    assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING"), probe.stderr
    # The flags compose passes serve /metrics (on the address the host's port leads to).
    assert scrape(local.metrics_port)["fedgrpc_current_round"] >= 0

    clients = [spawn(name, local(name, command(services[name])), logs) for name in CLIENTS]
    procs.extend(clients)
    state = local.containers.path(COORDINATOR, "/state")
    wait_until(
        lambda: (state / "state.db").exists() and read_status(state)["rounds_completed"] >= 1,
        120,
        "the first round to be committed",
    )
    # `docker compose restart coordinator`: SIGTERM, then the same command again.
    server.kill(signal.SIGTERM)
    assert server.popen.returncode == 0, server.log()
    stopped_at = read_status(state)["rounds_completed"]
    restarted = spawn("coordinator-restarted", server_argv, logs)
    procs.append(restarted)

    for client in clients:
        assert client.wait(180) == 0, client.log()
    assert restarted.wait(60) == 0, restarted.log()
    status = read_status(state)
    assert status["status"] == "finished"
    assert [r["round"] for r in status["rounds"]] == list(range(1, status["total_rounds"] + 1))
    assert f"resuming from {state}: {stopped_at} round(s) completed" in restarted.log()
    assert "mTLS (client certificates required)" in restarted.log()
