"""Real coordinator and client processes for integration tests (no mocks).

Synchronization is by events, never by sleeping: gRPC health checks with wait_for_ready,
process exit, or polling a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcore.security import TlsFiles, open_channel
from fedcore.wire import CHANNEL_OPTIONS

REPO = Path(__file__).resolve().parents[1]
TASK = "examples.digits:task"
PROBE_OPTIONS = (
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this process: the kernel may offer a port
    again as soon as its probe socket closes, before the process it was meant for binds it."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FEDGRPC_CONFIG", None)
    env.pop("FEDGRPC_FAULT", None)  # fault injection only where a test asks for it
    # Importing fedserver/fedclient here set gRPC's quiet default in this process; each child
    # must choose its own, as it does started from a user's shell.
    env.pop("GRPC_VERBOSITY", None)
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit in {timeout}s:\n{self.log()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def spawn(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> Proc:
    """Start `python ARGS` (after `prefix`, e.g. `ip netns exec NS`); `env` adds variables."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:  # append: a restarted process keeps its history
        popen = subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**child_env(), **(env or {})},
            cwd=REPO,
        )
    return Proc(name, popen, log_path)


def start_coordinator(
    log_dir: Path,
    port: int,
    state_dir: Path,
    *extra: str,
    task: str = TASK,
    name: str = "server",
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> Proc:
    args = ["-m", "fedserver.cli", "run", "--task", task, "--port", str(port)]
    args += ["--state-dir", str(state_dir), "--linger", "10", *extra]
    return spawn(name, args, log_dir, env, prefix)


def start_client(
    log_dir: Path,
    port: int,
    partition: str,
    *extra: str,
    task: str = TASK,
    name: str | None = None,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> Proc:
    index = partition.split("/")[0]
    args = ["-m", "fedclient.cli", "run", "--server", f"{host}:{port}", "--task", task]
    args += ["--partition", partition, "--client-id", f"client-{index}", "--threads", "1"]
    args += ["--give-up-after", "120", *extra]
    return spawn(name or f"client-{index}", args, log_dir, env, prefix)


# The usual federation: start_serving, start_clients, wait_finished. Each process goes into the
# test's `procs` fixture (killed after the test, whatever happened) as soon as it exists.
def start_serving(
    procs: list[Proc], log_dir: Path, port: int, state_dir: Path, *extra: str, **options: Any
) -> Proc:
    """start_coordinator (same options), returned once its health check answers SERVING."""
    server = start_coordinator(log_dir, port, state_dir, *extra, **options)
    procs.append(server)
    wait_serving(port, server)
    return server


def start_clients(
    procs: list[Proc], log_dir: Path, port: int, count: int, *extra: str, task: str = TASK
) -> list[Proc]:
    """Clients 0..count-1 on partitions i/count, each with the same extra flags."""
    clients = [start_client(log_dir, port, f"{i}/{count}", *extra, task=task) for i in range(count)]
    procs.extend(clients)
    return clients


def wait_finished(server: Proc, clients: Sequence[Proc], timeout: float) -> None:
    """Every client exits 0 within `timeout` s, then the coordinator once its linger is over."""
    for client in clients:
        code = client.wait(timeout)
        # The coordinator's side too: a client that never got through is half the story.
        assert code == 0, f"{client.log()}\n--- {server.name}, last lines:\n{server.log()[-6000:]}"
    assert server.wait(60) == 0, server.log()


def wait_serving(
    port: int, proc: Proc | None = None, timeout: float = 60.0, tls: TlsFiles | None = None
) -> None:
    """Block until the coordinator's gRPC health check answers SERVING (over TLS if given)."""
    deadline = time.monotonic() + timeout
    # Short reconnect backoff: gRPC's default grows to many seconds while the coordinator is
    # still importing torch, long enough for a quick run to finish before we look.
    with open_channel(f"127.0.0.1:{port}", tls, options=PROBE_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited early:\n{proc.log()}")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=2.0, wait_for_ready=True
                )
            except grpc.RpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise AssertionError(f"coordinator on port {port} not serving after {timeout}s")


def scrape(port: int) -> dict[str, float]:
    """A coordinator's /metrics: sample name (with labels) -> value (Prometheus text format)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


_POLL = threading.Event()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a cheap condition until it holds (for files and logs that offer no event)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        _POLL.wait(delay)  # a poll interval between checks, not a synchronization point
        delay = min(delay * 2, 0.2)


def fedserver(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`fedserver ARGS` exactly as an operator would run it; the caller checks returncode."""
    return run_module("fedserver.cli", *args, timeout=timeout)


def run_module(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` from the repo, output captured; the caller checks returncode."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=timeout,
    )


def status_json(state_dir: Path) -> dict[str, Any]:
    """`fedserver status --state-dir STATE --json`."""
    out = fedserver("status", "--state-dir", str(state_dir), "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))
