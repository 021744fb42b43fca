"""Help and errors as a newcomer reads them: a mistyped flag gets one error line, the closest
flag and a pointer to --help; every flag says what it does and its default; examples keep their
line breaks; `--secure` offers only what it supports; `fedserver status` prints an aligned
table and stops quietly when its reader does; a coordinator writing to a file says that it is
waiting for clients; `simulate` keeps per-update lines at DEBUG."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclient.cli import build_parser as client_parser
from fedcore.config import BROKEN_PIPE
from fedcore.tensors import flatten_state_dict
from fedserver.cli import build_parser as server_parser
from fedserver.cli import round_table
from fedserver.simulation.cli import run_simulation
from fedserver.state.history import RoundRecord
from fedserver.state.store import StateStore
from tests.procs import REPO, Proc, child_env, free_port, start_serving, wait_until

pytestmark = pytest.mark.timeout(120)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=child_env(), timeout=60
    )


@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        (
            ("fedserver.cli", "run", "--task", "examples.digits:task", "--rouns", "3"),
            [
                "fedserver: error: unrecognized arguments: --rouns 3",
                "--rouns: did you mean --rounds?",
                "see `fedserver run --help`",
            ],
        ),
        (
            ("fedclient.cli", "run", "--server", "h:1", "--task", "m:t", "--partiton", "0/2"),
            [
                "fedclient: error: unrecognized arguments: --partiton 0/2",
                "--partiton: did you mean --partition?",
                "see `fedclient run --help`",
            ],
        ),
        (
            ("fedserver.cli", "run", "--rouns", "3"),
            [
                "fedserver run: error: the following arguments are required: --task",
                "--rouns: did you mean --rounds?",
                "see `fedserver run --help`",
            ],
        ),
        (
            ("fedserver.cli", "run", "--task", "m:t", "--secure", "async"),
            [
                "fedserver run: error: argument --secure: invalid choice: 'async' "
                "(choose from 'none', 'secagg', 'he')",
                "see `fedserver run --help`",
            ],
        ),
    ],
)
def test_a_usage_error_is_its_line_a_suggestion_and_a_pointer(
    argv: tuple[str, ...], lines: list[str]
) -> None:
    out = run(*argv)
    assert out.returncode == 2
    assert out.stderr.splitlines() == lines


def _commands() -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for program, parser in (("fedserver", server_parser()), ("fedclient", client_parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found += [(f"{program} {name}", p) for name, p in sub.choices.items()]
    return found


def test_every_flag_says_what_it_does_and_its_default() -> None:
    missing = []
    for command, parser in _commands():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = (action.help or "").rstrip()
            shows_default = text.endswith(")") or "default" in text
            if not text or (action.default not in (None, False, "") and not shows_default):
                missing.append(f"{command} {action.option_strings[0]}: {text!r}")
    assert missing == []


def test_secure_offers_only_what_it_supports_each_explained() -> None:
    run_cmd = dict(_commands())["fedserver run"]
    secure = next(a for a in run_cmd._actions if a.dest == "secure")
    assert secure.choices == ["none", "secagg", "he"]
    assert all(f"'{choice}' =" in (secure.help or "") for choice in secure.choices)


@pytest.mark.parametrize(
    ("argv", "example"),
    [
        (
            ("fedserver.cli", "run", "--help"),
            "--host 0.0.0.0 \\\n      --tls-cert certs/server.crt",
        ),
        (("fedclient.cli", "run", "--help"), "examples.digits:task \\\n      --partition 0/3"),
    ],
)
def test_help_examples_keep_their_line_breaks(argv: tuple[str, ...], example: str) -> None:
    out = run(*argv)
    assert out.returncode == 0
    assert example in out.stdout


def _round(number: int, participants: int, metrics: dict[str, float]) -> dict[str, object]:
    return {"round": number, "participants": participants, "metrics": metrics}


def test_status_table_columns_align() -> None:
    rows = [
        _round(1, 3, {"accuracy": 0.5, "loss": 1.234567}),
        _round(10, 12, {"accuracy": 0.97222, "loss": 0.1, "fed_accuracy": 0.9}),
    ]
    assert round_table(rows) == [
        "  round  clients  accuracy  fed_accuracy   loss",
        "      1        3       0.5             -  1.235",
        "     10       12    0.9722           0.9    0.1",
    ]


def _state_with_rounds(state: Path, rounds: int) -> None:
    model = flatten_state_dict({"w": torch.arange(6, dtype=torch.float32)})
    store = StateStore(state)
    try:
        store.write_checkpoint(0, model, {"m": np.zeros(6, dtype=np.float32)})
        for n in range(1, rounds + 1):
            metrics = {"accuracy": n / rounds, "loss": 1.0 / n}
            store.commit_round(RoundRecord(n, model.version, 3, 90, metrics, 0, 1, 1, 1), [])
        store.set_meta(total_rounds=rounds, status="finished", task="m:t", strategy="fedavg")
    finally:
        store.close()


def test_status_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`fedserver status | head -2`: the reader is gone before the writer is done."""
    state = tmp_path / "state"
    _state_with_rounds(state, 200)
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after head exits
    try:
        out = subprocess.run(
            [sys.executable, "-m", "fedserver.cli", "status", "--state-dir", str(state)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO,
            timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (BROKEN_PIPE, "")


def test_status_prints_the_table(tmp_path: Path) -> None:
    _state_with_rounds(tmp_path / "state", 2)
    out = run("fedserver.cli", "status", "--state-dir", str(tmp_path / "state"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1:] == [
        "  round  clients  accuracy  loss",
        "      1        3       0.5     1",
        "      2        3         1   0.5",
    ]


@pytest.mark.integration
def test_coordinator_logging_to_a_file_says_it_waits_for_clients(
    tmp_path: Path, procs: list[Proc]
) -> None:
    server = start_serving(
        procs, tmp_path / "logs", free_port(), tmp_path / "state", "--min-clients", "3"
    )
    said = "round 1/20: waiting for clients: 0/3 live"
    wait_until(lambda: said in server.log(), 60, "the waiting line")


def test_simulate_logs_updates_at_debug_only(tmp_path: Path) -> None:
    updates = logging.getLogger("fedserver.updates")
    try:
        for level, shown in (("info", False), ("debug", True)):
            updates.setLevel(logging.NOTSET)
            args = server_parser().parse_args(
                ["simulate", "--task", "m:t", "--clients", "2", "--log-level", level,
                 "--client-resources", "nonsense"]
            )  # fmt: skip
            assert run_simulation(args) == 2  # a usage error, after logging is set up
            assert updates.isEnabledFor(logging.INFO) is shown
    finally:
        updates.setLevel(logging.NOTSET)
        logging.getLogger().handlers.clear()
