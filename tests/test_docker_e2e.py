"""docker-compose.yml under a real Docker engine, unchanged: build, certs, mTLS, train, restart.

certs (one-shot) -> coordinator healthy (its healthcheck is a gRPC health check over mTLS) ->
three clients, each holding only ca.crt and its own pair -> `compose restart coordinator` in the
middle of the run, which resumes from the state volume at the next round -> 20 rounds, held-out
accuracy >= 0.95, every container exits 0.

/metrics (plaintext) answers on the host's published port and not from a client container,
by the coordinator's name or its `ops` alias (docker-compose.yml "Networks").

Runs only when selected (`make docker-e2e`, which prepares a registry-less Debian host, or
`pytest -m docker` where Docker and compose exist) and skips without a Docker engine. The
project name is unique and `down -v` removes its containers, network and volumes at the end.
Environment: FEDGRPC_BASE_IMAGE (a stand-in for python:3.11-slim) is passed to the build;
DOCKER_HOST picks the engine (`make docker-e2e` sets it to the daemon docker/host-setup.sh
started for the test, never the host's own).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.compose_files import CLIENTS, COMPOSE, COORDINATOR, INIT, REPO, load
from tests.procs import free_port, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

ROUNDS, TARGET_ACCURACY = 20, 0.95
RESTART_AFTER = 2  # rounds committed before `restart coordinator`: mid-run, far from the end
IMAGE = load(COMPOSE)["services"][COORDINATOR]["image"]


def _docker_compose() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, what Debian bookworm packages)."""
    if shutil.which("docker") is None:
        return None
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return None
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if v2.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


class Project:
    """One compose project over the repo's compose file, and the docker calls the test needs."""

    def __init__(self, compose: list[str]) -> None:
        self.name = f"fedgrpc-e2e-{os.getpid()}-{secrets.token_hex(3)}"
        self.compose = [*compose, "--project-name", self.name, "--file", str(COMPOSE)]
        # Host ports are the only thing shared with other tests on this machine: free ones.
        self.env = {
            **os.environ,
            "FEDGRPC_PORT": str(free_port()),
            "FEDGRPC_METRICS_PORT": str(free_port()),
        }

    def run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [*self.compose, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"compose {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def container(self, service: str) -> str:
        """The id of the service's container (running or not), by compose's own labels."""
        out = docker(
            "ps", "--all", "--quiet",
            "--filter", f"label=com.docker.compose.project={self.name}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).split()  # fmt: skip
        assert len(out) == 1, f"{service}: containers {out}"
        return out[0]

    def state(self, service: str) -> dict[str, Any]:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.container(service)))

    def logs(self, service: str) -> str:
        done = subprocess.run(
            ["docker", "logs", self.container(service)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return done.stdout

    def volume(self, name: str) -> str:
        return f"{self.name}_{name}"

    def files_in(self, volume: str) -> set[str]:
        """File names in a volume, listed by the image's own (unprivileged) user."""
        out = docker("run", "--rm", "--network", "none", "-v", f"{volume}:/v:ro", IMAGE,
                     "find", "/v", "-type", "f", "-printf", "%f\\n")  # fmt: skip
        return set(out.split())

    def mounted_volumes(self, service: str) -> dict[str, str]:
        """Destination -> volume name of the service's container."""
        mounts = json.loads(
            docker("inspect", "--format", "{{json .Mounts}}", self.container(service))
        )
        assert all(m["Type"] == "volume" for m in mounts), f"{service}: {mounts}"
        return {m["Destination"]: m["Name"] for m in mounts}

    def exited(self, service: str) -> bool:
        return self.state(service)["Status"] == "exited"


def docker(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stderr}"
    return done.stdout


def progress(message: str) -> None:
    """One line per stage, for `make docker-e2e` (pytest -s) runs that take minutes."""
    print(f"[docker-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


@pytest.fixture
def project() -> Iterator[Project]:
    compose = _docker_compose()
    if compose is None:
        pytest.skip("no Docker engine with compose here (see `make docker-e2e`)")
    project = Project(compose)
    try:
        yield project
    finally:
        for service in (INIT, COORDINATOR, *CLIENTS):
            with_logs = subprocess.run(
                [*project.compose, "logs", "--no-color", "--tail", "40", service],
                cwd=REPO, env=project.env, capture_output=True, text=True,
            )  # fmt: skip
            print(f"--- {service}\n{with_logs.stdout}")
        # A failure between pause and unpause leaves frozen clients, which `down` cannot stop.
        subprocess.run(
            [*project.compose, "unpause"], cwd=REPO, env=project.env, capture_output=True
        )
        project.run("down", "--volumes", "--remove-orphans", "--timeout", "10")


def test_compose_up_trains_with_mtls_and_resumes_after_restart(project: Project) -> None:
    started = time.monotonic()
    progress(f"building {IMAGE} (project {project.name})")
    project.run("build", COORDINATOR, timeout=3000)  # one image; every service runs it
    built = time.monotonic()
    progress(f"built in {built - started:.0f}s; compose up")
    project.run("up", "--detach", timeout=600)

    # certs ran once and succeeded; the coordinator is healthy by its mTLS health check.
    wait_until(lambda: project.exited(INIT), 120, "the certs service to finish")
    assert project.state(INIT)["ExitCode"] == 0, project.logs(INIT)
    wait_until(
        lambda: project.state(COORDINATOR).get("Health", {}).get("Status") == "healthy",
        300,
        "the coordinator's healthcheck (fedserver health over mTLS)",
    )
    assert "security: mTLS (client certificates required)" in project.logs(COORDINATOR)
    progress(f"coordinator healthy over mTLS at {time.monotonic() - started:.0f}s")

    # /metrics: the host reads it through its published port; no client container reaches it.
    metrics_port = int(project.env["FEDGRPC_METRICS_PORT"])
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        assert b"fedgrpc_current_round" in r.read()
    reach = (
        "import socket, sys\n"
        "for host in sys.argv[1:]:\n"
        "    try:\n"
        "        socket.create_connection((host, 9100), timeout=5).close()\n"
        "        print(host, 'REACHED')\n"
        "    except OSError as e:\n"
        "        print(host, 'refused:', e)\n"
    )
    tried = docker("exec", project.container(CLIENTS[0]), "python", "-c", reach,
                   COORDINATOR, "coordinator-ops")  # fmt: skip
    assert "REACHED" not in tried and tried.count("refused:") == 2, tried

    # Keys: each client container mounts one volume, holding ca.crt and its own pair.
    for name in CLIENTS:
        mounted = project.mounted_volumes(name)
        assert mounted == {"/certs": project.volume(f"fedgrpc-certs-{name}")}, mounted
        assert project.files_in(mounted["/certs"]) == {"ca.crt", f"{name}.crt", f"{name}.key"}
    coordinator_files = set().union(
        *(project.files_in(v) for d, v in project.mounted_volumes(COORDINATOR).items())
    )
    assert "ca.key" not in coordinator_files
    assert not {f"{name}.key" for name in CLIENTS} & coordinator_files
    assert "ca.key" in project.files_in(project.volume("fedgrpc-certs"))

    # Restart the coordinator mid-run; it must resume from its checkpoint, not at round 1.
    # The clients are paused (cgroup freezer) first: rounds take well under a second, so
    # otherwise the run could end before the restart lands. Paused, they can finish no round.
    wait_until(
        lambda: f"round {RESTART_AFTER}/{ROUNDS} closed" in project.logs(COORDINATOR),
        600,
        f"round {RESTART_AFTER} to close",
    )
    project.run("pause", *CLIENTS)
    progress(f"round {RESTART_AFTER} closed; clients paused; compose restart {COORDINATOR}")
    project.run("restart", COORDINATOR, timeout=300)
    resumed = re.compile(r"resuming from /state: (\d+) round\(s\) completed")
    closed = re.compile(rf"round (\d+)/{ROUNDS} closed")
    opened = re.compile(rf"round (\d+)/{ROUNDS} opened")
    wait_until(
        lambda: resumed.search(project.logs(COORDINATOR)) is not None, 300, "the resume line"
    )
    logs = project.logs(COORDINATOR)
    match = resumed.search(logs)
    assert match is not None
    before = [int(n) for n in closed.findall(logs[: match.start()])]
    completed = int(match[1])
    # Every round closed before the restart is kept, and none is run again.
    assert before == list(range(1, completed + 1)), logs
    assert RESTART_AFTER <= completed < ROUNDS, logs
    project.run("unpause", *CLIENTS)

    def since_resume() -> str:
        text = project.logs(COORDINATOR)
        return text[text.index(match[0]) :]

    wait_until(lambda: opened.search(since_resume()) is not None, 300, "a round after the resume")
    first = opened.search(since_resume())
    assert first is not None and int(first[1]) == completed + 1, since_resume()
    progress(f"resumed with {completed} round(s) completed; round {completed + 1} opened")

    # Every client finishes and exits 0; the coordinator finishes and stays down (exit 0).
    for name in (*CLIENTS, COORDINATOR):
        wait_until(lambda name=name: project.exited(name), 1200, f"{name} to finish")
        assert project.state(name)["ExitCode"] == 0, project.logs(name)
    finished = time.monotonic()

    status = json.loads(
        docker(
            "run", "--rm", "--network", "none",
            "-v", f"{project.volume('fedgrpc-state')}:/state",
            IMAGE, "fedserver", "status", "--state-dir", "/state", "--json",
        )
    )  # fmt: skip
    assert status["status"] == "finished"
    assert [r["round"] for r in status["rounds"]] == list(range(1, ROUNDS + 1))
    accuracy = status["rounds"][-1]["metrics"]["accuracy"]
    assert accuracy >= TARGET_ACCURACY, status["rounds"][-1]
    progress(
        f"{ROUNDS} rounds, final accuracy {accuracy:.4f}; build {built - started:.0f}s, "
        f"up to finished {finished - built:.0f}s, total {finished - started:.0f}s"
    )
