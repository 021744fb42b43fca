"""`fedserver.simulation.api.run(...)`: `fedserver simulate` from Python, returning the history."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from fedserver.simulation import api as simulation
from tests.procs import fedserver

DIGITS = "examples.digits:task"
FLAGS = {"rounds": 2, "clients_per_round": 3, "seed": 1, "workers": 0, "eval_every": 1}


@pytest.mark.timeout(240)
def test_run_returns_the_history_and_the_commands_model(tmp_path: Path) -> None:
    history = simulation.run(DIGITS, 6, state_dir=tmp_path / "api", **FLAGS)
    assert (history.exit_code, history.failure) == (0, "")
    assert [r["round"] for r in history.rounds] == [1, 2]
    assert [r["participants"] for r in history.rounds] == [3, 3]
    accuracy = history.metric("accuracy")
    assert len(accuracy) == 2 and all(0.0 < a <= 1.0 for a in accuracy)
    assert all(math.isnan(v) for v in history.metric("no_such_metric"))
    # The same run as the command line: same flags, same seed, same model bytes.
    cli = tmp_path / "cli"
    out = fedserver(
        *("simulate", "--task", DIGITS, "--clients", "6", "--state-dir", str(cli)),
        *("--rounds", "2", "--clients-per-round", "3", "--seed", "1", "--workers", "0"),
        *("--eval-every", "1"),
        timeout=200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert history.model_path.read_bytes() == (cli / "model.safetensors").read_bytes()


@pytest.mark.timeout(240)
def test_run_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    """Jupyter runs an event loop in the notebook's thread: asyncio.run would refuse."""

    async def notebook_cell() -> simulation.History:
        return simulation.run(DIGITS, 4, state_dir=tmp_path / "s", rounds=1, workers=0)

    history = asyncio.run(notebook_cell())
    assert history.exit_code == 0 and len(history.rounds) == 1


def test_bad_settings_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--clients 2 is below --min-clients 3"):
        simulation.run(DIGITS, 2, state_dir=tmp_path / "s", min_clients=3, workers=0)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="bad simulate settings"):
        simulation.run(DIGITS, 2, state_dir=tmp_path / "s", no_such_flag=1)
