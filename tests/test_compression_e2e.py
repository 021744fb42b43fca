"""Clients that each pick their own lossy encoding still train digits to a good model."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.digits import task
from fedcore.codecs import get_codec
from fedserver.state.history import read_status
from tests.procs import Proc, free_port, start_client, start_serving, wait_finished

ROUNDS = 12
TARGET_ACCURACY = 0.93

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


def test_mixed_lossy_encodings_reach_target_accuracy(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    server = start_serving(procs, logs, port, state, "--rounds", str(ROUNDS), "--min-clients", "3")
    # Negotiated per client: the round config says fp32, each client declares its own codec.
    encodings = ["topk", "int8", "fp16"]
    clients = [
        start_client(logs, port, f"{i}/3", "--encoding", enc) for i, enc in enumerate(encodings)
    ]
    procs.extend(clients)
    wait_finished(server, clients, 200)
    status = read_status(state)
    assert status["rounds_completed"] == ROUNDS
    assert all(r["participants"] == 3 for r in status["rounds"])
    assert status["rounds"][-1]["metrics"]["accuracy"] >= TARGET_ACCURACY
    floats = task.initial_model(0).manifest.floats()
    for client, enc in zip(clients, encodings, strict=True):
        size = get_codec(enc).wire_manifest(floats).total_bytes
        assert f"update accepted ({size} bytes)" in client.log()
