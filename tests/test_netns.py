"""Multi-host: coordinator and clients in their own network namespaces; one client's link is cut.

Topology, all created and torn down here (nothing is added to the host's own namespace):

    ns "sw": bridge br0 ── veth ── ns "co" eth0 10.200.0.1  fedserver
                      ├── veth ── ns "c0" eth0 10.200.0.10 fedclient client-0
                      └── veth ── ns "c1" eth0 10.200.0.11 fedclient client-1 (gated task)

client-1 blocks in its 2nd round of training (the gate); the test cuts its switch port (as if a
cable were pulled) and waits: the round closes at its deadline with client-0 alone (--min-fit 1).
Then the link is restored and the gate opened; client-1's late update is refused as stale, it
moves on, and it takes part in a later round. Skipped where namespaces cannot be created.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procs import Proc, start_client, start_coordinator, status_json, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

SUBNET = "10.200.0"
COORDINATOR = f"{SUBNET}.1"
PORT = 50051
ROUNDS = 5


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Net:
    tag: str
    namespaces: list[str] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"fg{self.tag}{name}"

    def add_host(self, name: str, address: str) -> None:
        """A namespace with eth0 at `address`, plugged into the bridge in the switch namespace."""
        ns, port = self.ns(name), f"p{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
            "netns", self.ns("sw"))  # fmt: skip
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", self.ns("sw"), "link", "set", port, "master", "br0", "up")

    def link(self, name: str, up: bool) -> None:
        _ip("-n", self.ns("sw"), "link", "set", f"p{name}", "up" if up else "down")

    def exec(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net(tag=str(os.getpid() % 100000))
    try:
        _ip("netns", "add", n.ns("sw"))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot create network namespaces here ({detail.strip()})")
    n.namespaces.append(n.ns("sw"))
    try:
        _ip("-n", n.ns("sw"), "link", "add", "br0", "type", "bridge")
        _ip("-n", n.ns("sw"), "link", "set", "br0", "up")
        n.add_host("co", COORDINATOR)
        n.add_host("c0", f"{SUBNET}.10")
        n.add_host("c1", f"{SUBNET}.11")
        yield n
    finally:
        for ns in reversed(n.namespaces):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_cut_link_round_closes_without_client_which_rejoins_later(tmp_path: Path, net: Net) -> None:
    state, logs, gate = tmp_path / "state", tmp_path / "logs", tmp_path / "gate"
    gate.mkdir()
    started: list[Proc] = []
    try:
        server = start_coordinator(
            logs, PORT, state, "--host", COORDINATOR, "--rounds", str(ROUNDS),
            "--min-clients", "2", "--min-fit", "1", "--round-timeout", "10",
            prefix=net.exec("co"),
        )  # fmt: skip
        started.append(server)
        wait_until(lambda: "coordinator listening" in server.log(), 60, "coordinator to listen")
        env = {"FLAKY_DIR": str(gate), "GATE_CALL": "2"}
        for i, task in ((0, "examples.digits:task"), (1, "tests.flaky_task:gated")):
            started.append(
                start_client(
                    logs,
                    PORT,
                    f"{i}/2",
                    task=task,
                    env=env,
                    host=COORDINATOR,
                    prefix=net.exec(f"c{i}"),
                )
            )
        client0, client1 = started[1], started[2]

        # client-1 is mid-round (training); pull its cable. The round must close without it.
        wait_until((gate / "gate-waiting").exists, 120, "client-1 to be training")
        net.link("c1", up=False)
        cut_round = status_json(state)["rounds_completed"] + 1
        wait_until(
            lambda: status_json(state)["rounds_completed"] >= cut_round, 90, "round to close"
        )
        # Plug it back in and let client-1 finish: its update is late, it must move on.
        net.link("c1", up=True)
        (gate / "gate-open").write_text("")
        for proc in (client0, client1):
            assert proc.wait(150) == 0, proc.log()
        assert server.wait(60) == 0, server.log()
    finally:
        for proc in started:
            proc.kill()

    status = status_json(state)
    participants = [r["participants"] for r in status["rounds"]]
    assert status["status"] == "finished"
    assert [r["round"] for r in status["rounds"]] == list(range(1, ROUNDS + 1))
    assert participants[cut_round - 1] == 1  # closed at its deadline without client-1
    assert 2 in participants[cut_round:], participants  # client-1 rejoined a later round
    assert f"round {cut_round} update not counted" in client1.log()
    print(f"\nnetns: link cut in round {cut_round}; participants per round {participants}")
