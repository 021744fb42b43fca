"""The command lines as a user meets them: help, bad arguments, unreachable coordinators."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import Proc, child_env, free_port, start_client, start_serving, wait_finished

pytestmark = pytest.mark.timeout(120)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=child_env(), timeout=60
    )


@pytest.mark.parametrize(
    ("module", "words"),
    [
        (("fedserver.cli", "--help"), ["run", "status", "FEDGRPC_"]),
        (("fedserver.cli", "run", "--help"), ["--task", "--min-clients", "--round-timeout"]),
        (("fedclient.cli", "run", "--help"), ["--server", "--partition", "--give-up-after"]),
    ],
)
def test_help_explains(module: tuple[str, ...], words: list[str]) -> None:
    out = run(*module)
    assert out.returncode == 0
    for word in words:
        assert word in out.stdout


def test_bad_task_is_a_usage_error(tmp_path: Path) -> None:
    out = run("fedserver.cli", "run", "--task", "nosuchmodule:task", "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert "cannot import module 'nosuchmodule'" in out.stderr


def test_bad_partition_is_a_usage_error() -> None:
    out = run(
        "fedclient.cli", "run", "--server", "127.0.0.1:1", "--task", "examples.digits:task",
        "--partition", "3/3",
    )  # fmt: skip
    assert out.returncode == 2
    assert "partition" in out.stderr


def test_status_of_an_empty_dir_says_so(tmp_path: Path) -> None:
    out = run("fedserver.cli", "status", "--state-dir", str(tmp_path))
    assert out.returncode == 1
    assert "no fedgrpc state" in out.stderr


@pytest.mark.integration
def test_second_coordinator_on_a_busy_port_refuses_to_start(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Not both serving with the clients split between them (gRPC's default SO_REUSEPORT)."""
    port = free_port()
    start_serving(procs, tmp_path / "logs", port, tmp_path / "first")
    out = run(
        "fedserver.cli", "run", "--task", "examples.digits:task", "--port", str(port),
        "--state-dir", str(tmp_path / "second"),
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}: is the port in use?" in out.stderr


def test_client_gives_up_on_an_unreachable_coordinator(tmp_path: Path, procs: list[Proc]) -> None:
    client = start_client(tmp_path, free_port(), "0/1", "--give-up-after", "2")
    procs.append(client)
    assert client.wait(60) == 1
    log = client.log()
    assert "unreachable (connection refused); retrying, 0 s so far" in log  # it did retry first
    assert "unreachable for 2s" in log


@pytest.mark.integration
def test_client_started_before_the_coordinator_joins_later(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    client = start_client(tmp_path / "logs", port, "0/1")
    procs.append(client)
    server = start_serving(
        procs, tmp_path / "logs", port, tmp_path / "state", "--rounds", "2", "--min-clients", "1"
    )
    wait_finished(server, [client], 120)
    assert "training is finished" in client.log()
