"""Graceful shutdown: SIGTERM on the coordinator, SIGINT on a client, then carry on.

client-1 runs the gated task (tests/flaky_task.py) and is held mid-training in round 2 while
client-0 has submitted and is long-polling. SIGTERM then makes the coordinator tell client-0
SHUTTING_DOWN, persist its state (status "stopped", round 1 committed) and exit 0. SIGINT makes
client-1 abandon its round and exit 130 with a clear message. A new coordinator resumes on the
same state dir; client-0 (never restarted) and a fresh client-1 finish the run and exit 0.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.procs import (
    Proc,
    free_port,
    start_client,
    start_coordinator,
    start_serving,
    status_json,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROUNDS = 3


def test_sigterm_coordinator_and_sigint_client(tmp_path: Path, procs: list[Proc]) -> None:
    port, state, logs, gate = free_port(), tmp_path / "state", tmp_path / "logs", tmp_path / "gate"
    gate.mkdir()
    flags = ("--rounds", str(ROUNDS), "--min-clients", "2", "--round-timeout", "120")
    server = start_serving(procs, logs, port, state, *flags, name="server-1")
    client0 = start_client(logs, port, "0/2")
    client1 = start_client(
        logs, port, "1/2", task="tests.flaky_task:gated",
        env={"FLAKY_DIR": str(gate), "GATE_CALL": "2"},
    )  # fmt: skip
    procs.extend([client0, client1])

    # Round 2: client-1 is held in training; client-0 has submitted and waits for the round.
    wait_until((gate / "gate-waiting").exists, 120, "client-1 to train in round 2")
    wait_until(lambda: "round 2: update 1/2 from client-0" in server.log(), 60, "client-0")
    server.kill(signal.SIGTERM)
    assert server.popen.returncode == 0, server.log()
    assert "stop requested" in server.log()
    status = status_json(state)
    assert status["status"] == "stopped" and status["rounds_completed"] == 1
    wait_until(lambda: "coordinator is shutting down" in client0.log(), 30, "client-0 told")

    client1.kill(signal.SIGINT)
    assert client1.popen.returncode == 130
    assert "interrupted: abandoning the current round" in client1.log()

    server = start_coordinator(logs, port, state, *flags, name="server-2")
    procs.append(server)
    client1 = start_client(logs, port, "1/2", name="client-1-again")
    procs.append(client1)
    for client in (client0, client1):
        assert client.wait(180) == 0, client.log()
        assert "training is finished" in client.log()
    assert server.wait(60) == 0, server.log()
    assert "resuming from" in server.log() and "1 round(s) completed" in server.log()
    status = status_json(state)
    assert status["status"] == "finished"
    assert [r["round"] for r in status["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["participants"] == 2 for r in status["rounds"])
