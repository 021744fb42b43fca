"""Adaptive DP clipping end to end: a real coordinator and clients; the clip each round used is in
the history and in status, ε is the accountant's for the combined z, and what cannot be sound
is refused at start-up (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

pytestmark = [pytest.mark.integration]

ROUNDS = 3
Z = 0.5


def _check_rounds(rounds: list[dict[str, Any]], initial: float, count: int) -> None:
    """Round 1 used the initial clip, every later one the clip its predecessor computed; ε is
    Opacus' for z (the combined mechanism's) at q = 1 (every live client, or an async buffer)."""
    assert len(rounds) == count
    acc = Accountant()
    for i, r in enumerate(rounds):
        m = r["metrics"]
        expected = initial if i == 0 else rounds[i - 1]["metrics"]["dp_clip_next"]
        assert m["dp_clip"] == pytest.approx(expected, rel=1e-12)
        assert m["dp_clip_next"] != m["dp_clip"]  # the noised count moved it
        assert m["dp_noise_multiplier"] == Z and m["dp_update_noise_multiplier"] > Z
        assert m["dp_sample_rate"] == 1.0
        acc.step(Z, 1.0)
        assert m["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
        assert not [k for k in m if k.startswith("client_dp")]  # client bits never recorded


@pytest.mark.timeout(180)
def test_server_side_adaptive_clip_per_round_in_history_and_status(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, "--rounds", str(ROUNDS), "--min-clients", "3",
        "--local-epochs", "1", "--dp-adaptive-clip", "server", "--dp-noise-multiplier", str(Z),
        "--dp-clipped-count-stddev", "1.0", "--dp-initial-clip", "0.2",
    )  # fmt: skip
    wait_finished(server, start_clients(procs, logs, port, 3), 150)

    rounds = status_json(state)["rounds"]
    _check_rounds(rounds, 0.2, ROUNDS)
    text = fedserver("status", "--state-dir", str(state)).stdout
    assert "dp_clip" in text.splitlines()[-ROUNDS - 1]  # a column of the round table
    # Clipping about half the updates is the point: no info line per clipped update.
    assert "clipped by the coordinator" not in server.log()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_client_side_adaptive_clip_under_async(tmp_path: Path, procs: list[Proc]) -> None:
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, "--mode", "async", "--buffer-size", "2", "--rounds", "4",
        "--min-clients", "3", "--local-epochs", "1", "--dp-adaptive-clip", "client",
        "--dp-noise-multiplier", str(Z), "--dp-clipped-count-stddev", "1.0",
    )  # fmt: skip
    wait_finished(server, start_clients(procs, logs, port, 3), 200)
    _check_rounds(status_json(state)["rounds"], 0.1, 4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            (
                "--dp-adaptive-clip",
                "server",
                "--dp-clipped-count-stddev",
                "5",
                "--secure",
                "secagg",
            ),
            "--dp-adaptive-clip server cannot be combined with --secure secagg: the "
            "coordinator sees no update's norm there",
        ),
        (("--dp-target-quantile", "0.3"), "--dp-target-quantile is for --dp-adaptive-clip"),
        (("--dp-clip", "1", "--dp-adaptive-clip", "server"), "cannot both be set"),
        # 3 clients per round / 20 = 0.15 is too little count noise for z = 1.
        (("--dp-adaptive-clip", "server"), "raise --dp-clipped-count-stddev above 0.5"),
        (
            ("--dp-adaptive-clip", "client", "--dp-clipped-count-stddev", "5", "--dp-clip-lr", "0"),
            "dp-clip-lr must be a positive number",
        ),
    ],
)
def test_adaptive_clip_refusals_at_startup(
    tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    state = tmp_path / "state"
    args = ["run", "--task", "examples.digits:task", "--state-dir", str(state), "--port", "0"]
    out = fedserver(*args, "--min-clients", "3", *flags)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not state.exists()
