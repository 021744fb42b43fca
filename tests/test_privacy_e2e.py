"""DP-FedAvg end to end: real coordinator and clients; ε lands in the history and in status."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.privacy import Accountant
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    start_clients,
    start_serving,
    status_json,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROUNDS = 3


def test_dp_rounds_record_epsilon(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, "--rounds", str(ROUNDS), "--min-clients", "3",
        "--local-epochs", "1", "--dp-clip", "1.0", "--dp-noise-multiplier", "0.8",
        "--dp-delta", "1e-5",
    )  # fmt: skip
    wait_finished(server, start_clients(procs, logs, port, 3), 150)

    rounds = status_json(state)["rounds"]
    assert len(rounds) == ROUNDS
    # All 3 live clients are selected each round: sample rate 1, z = 0.8 on every round.
    acc = Accountant()
    for r in rounds:
        m = r["metrics"]
        assert m["dp_sample_rate"] == 1.0 and m["dp_noise_multiplier"] == 0.8
        acc.step(0.8, 1.0)
        assert m["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    text = fedserver("status", "--state-dir", str(state)).stdout
    assert f"privacy: (epsilon {rounds[-1]['metrics']['epsilon']:.4g}, delta 1e-05)-DP" in text
