"""A real coordinator and three real client processes train digits over gRPC on loopback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.digits import task
from tests.procs import Proc, free_port, start_clients, start_serving, status_json, wait_finished

ROUNDS = 20
TARGET_ACCURACY = 0.95

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_three_clients_reach_target_accuracy(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state = tmp_path / "state"
    logs = tmp_path / "logs"
    server = start_serving(procs, logs, port, state, "--rounds", str(ROUNDS), "--min-clients", "3")
    wait_finished(server, start_clients(procs, logs, port, 3), 180)

    # The published model loads into the task's model and is as good as the coordinator says.
    model = task.build_model()
    model.load_state_dict(load_file(state / "model.safetensors"))
    accuracy = task.evaluate(model, task.server_test_data())["accuracy"]
    assert accuracy >= TARGET_ACCURACY

    status = status_json(state)
    assert status["status"] == "finished"
    assert status["rounds_completed"] == ROUNDS
    assert [r["round"] for r in status["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["participants"] == 3 for r in status["rounds"])
    assert status["rounds"][-1]["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert sorted(p.name for p in (state / "checkpoints").iterdir()) == [
        f"round-{r:04d}.safetensors" for r in range(ROUNDS + 1)
    ]
    last = load_file(state / "checkpoints" / f"round-{ROUNDS:04d}.safetensors")
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())

    # fedclient sent the checksum the coordinator offered first (JoinReply.checksums).
    with sqlite3.connect(state / "state.db") as db:
        digests = [row[0] for row in db.execute("SELECT sha256 FROM receipts")]
    assert len(digests) == 3 * ROUNDS
    assert all(d.startswith("xxh3_128:") and len(d) == len("xxh3_128:") + 32 for d in digests)
