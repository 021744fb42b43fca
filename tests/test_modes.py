"""The registry of round modes (fedserver/modes): a mode written in one module
(tests/toy_mode.py) and added with one registry line runs a federation, shows in --help,
owns its flags and is kept by a resumed state dir."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from fedclient.virtual import client_id
from fedserver.cli import build_parser, main
from fedserver.commands.run import server_settings
from fedserver.coordinator.assembly import SetupError, build_coordinator
from fedserver.modes.registry import MODES
from fedserver.modes.synchronous import FedAvg
from fedserver.state.store import StateStore
from tests.test_simulation_driver import NEVER, _settings, _simulate
from tests.toy_mode import FirstK

pytestmark = pytest.mark.timeout(120)
TASK = "examples.digits:task"


@pytest.fixture
def first_k(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODES, "first-k", FirstK)  # the one registry line


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.usefixtures("first_k")
def test_a_toy_mode_runs_a_federation(tmp_path: Path) -> None:
    """4 virtual clients selected every round, rounds closed at the first 2 updates."""
    state = tmp_path / "state"
    flags = ("--clients", "4", "--min-clients", "4", "--rounds", "3", "--round-timeout", NEVER)
    s = _settings(state, TASK, *flags, "--mode", "first-k", "--first-k", "2", "--seed", "7")
    assert isinstance(s.server.mode, FirstK) and s.server.mode.first_k == 2
    assert s.server.defaults.mode == "fedavg"  # what its clients compute
    coordinator = asyncio.run(_simulate(s))
    assert not coordinator.failure
    assert coordinator.machine.rounds_completed == 3
    store = StateStore(state)
    try:
        assert [r.participants for r in store.rounds()] == [2, 2, 2]
        assert store.get_meta("mode") == "first-k"
        counted = [c for c in map(client_id, range(4)) if store.receipt_digest(1, c)]
        assert len(counted) == 2
    finally:
        store.close()
    # A resumed state dir keeps its mode, whichever modes the registry holds.
    more = dataclasses.replace(s.server.policy, total_rounds=5)
    resumed = dataclasses.replace(s.server, mode=FedAvg(), policy=more)
    with pytest.raises(SetupError, match="holds a run with --mode first-k, not fedavg"):
        build_coordinator(resumed)


@pytest.mark.usefixtures("first_k")
@pytest.mark.parametrize("command", ["run", "simulate"])
def test_help_lists_the_mode_and_its_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help(command, capsys).split())
    assert "{fedavg,fedsgd,async,first-k}" in text
    assert "first-k: synchronous rounds that close at their first --first-k updates" in text
    assert "--first-k N updates that close a round (needed)" in text


def test_secure_offers_only_protections(capsys: pytest.CaptureFixture[str]) -> None:
    """--secure chooses how contributions are protected; how rounds run is --mode's."""
    text = " ".join(_help("run", capsys).split())
    assert "--secure {none,secagg,he}" in text


@pytest.mark.usefixtures("first_k")
def test_a_modes_flag_under_another_mode_is_a_usage_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    argv = ["run", "--task", TASK, "--state-dir", str(state), "--port", "0", "--first-k", "2"]
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=r"^--first-k is for --mode first-k \(this run is "):
        server_settings(args)
    assert main(argv) == 2
    assert not state.exists()
    with pytest.raises(ValueError, match="--mode first-k needs --first-k N"):
        server_settings(build_parser().parse_args([*argv[:-2], "--mode", "first-k"]))


def test_the_registry_builds_the_known_modes() -> None:
    args = build_parser().parse_args(
        ["run", "--task", TASK, "--mode", "async", "--buffer-size", "3"]
    )
    mode = server_settings(args).mode
    assert mode.name == "async" and mode.protocol("none") == "buffered"
    assert mode.pinned_values() == {"buffer_size": "3"}
