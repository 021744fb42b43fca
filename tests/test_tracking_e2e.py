"""--track end to end: a real coordinator and clients on examples.digits, tracked into a real
MLflow server (its own process, SQLite backend) and into TensorBoard event files, each read
back with the tracker's own reader and compared with `fedserver status --json`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedserver.coordinator.tracking import ROUND_PREFIX
from tests.procs import (
    Proc,
    child_env,
    free_port,
    start_clients,
    start_serving,
    status_json,
    wait_finished,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
mlflow = pytest.importorskip("mlflow")

FLAGS = ("--rounds", "3", "--min-clients", "2", "--eval-every", "1", "--seed", "7")


def expected_metrics(state_dir: Path) -> dict[int, dict[str, float]]:
    """`fedserver status --json`'s rounds as tracked metrics: round -> name -> value."""
    out = {}
    for row in status_json(state_dir)["rounds"]:
        values = {k: float(v) for k, v in row["metrics"].items()}
        for k in ("participants", "num_examples", "duration_seconds", "attempts"):
            values[ROUND_PREFIX + k] = float(row[k])
        for k in ("bytes_in", "bytes_out"):
            values[ROUND_PREFIX + k] = float(row[k])
        out[row["round"]] = values
    return out


@dataclass
class MlflowServer:
    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        """SIGKILL the server and its workers (their own process group): the port goes dead."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """`mlflow server` on a free loopback port, SQLite backend, one worker, once its health
    endpoint answers; killed with its workers after the test."""
    port = free_port()
    log_path = tmp_path / "logs" / "mlflow.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = ["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    args += ["--artifacts-destination", str(tmp_path / "mlartifacts")]
    args += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=tmp_path,
            start_new_session=True,  # its workers die with it (kill)
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", popen, log_path)

    def healthy() -> bool:
        if popen.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    try:
        wait_until(healthy, 120, "the MLflow server's /health")
        yield server
    finally:
        server.kill()


def mlflow_metrics(client: Any, run_id: str, keys: set[str]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            assert m.step not in out.get(key, {}), f"{key} logged twice at step {m.step}"
            out.setdefault(m.step, {})[key] = m.value
    return out


def test_mlflow_run_matches_status(
    procs: list[Proc], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    url = mlflow_server.url
    state = tmp_path / "state"
    logs = tmp_path / "logs"
    # Two rounds, then the same state dir resumed for a third: one run, continued.
    for rounds in ("2", "3"):
        port = free_port()
        flags = (*FLAGS, "--rounds", rounds, "--track", f"mlflow://{url}", "--track-model")
        server = start_serving(procs, logs, port, state, *flags)
        clients = start_clients(procs, logs, port, 2)
        wait_finished(server, clients, 240)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    status = status_json(state)
    fid = status["federation_id"]
    runs = client.search_runs(
        [client.get_experiment_by_name("fedgrpc").experiment_id],
        f"tags.`fedgrpc.federation_id` = '{fid}'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["task"] == "examples.digits:task"
    assert params["strategy"] == "fedavg"
    assert params["mode"] == "fedavg"
    assert params["rounds.total_rounds"] == "2"  # as first logged (a parameter is fixed)
    assert params["eval.every"] == "1"
    assert params["seed"] == "7"
    assert params["dp"] == "False"
    expected = expected_metrics(state)
    assert sorted(expected) == [1, 2, 3]
    keys = {k for values in expected.values() for k in values}
    assert {"accuracy", "fed_accuracy", ROUND_PREFIX + "bytes_in"} <= keys
    assert mlflow_metrics(client, run.info.run_id, keys) == expected
    # The run id a resumed state dir continues.
    meta = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("
            "\"SELECT value FROM meta WHERE key LIKE 'track_run_id %'\").fetchone()[0])",
            str(state / "state.db"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert meta.stdout.strip() == run.info.run_id
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "model.safetensors" in artifacts


def test_tensorboard_events_match_status(procs: list[Proc], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "board"
    state = tmp_path / "state"
    port = free_port()
    logs = tmp_path / "logs"
    server = start_serving(procs, logs, port, state, *FLAGS, "--track", f"tensorboard://{board}")
    # The clients track their own metrics, one folder each.
    clients = start_clients(procs, logs, port, 2, "--track", f"tensorboard://{tmp_path / 'cl'}")
    wait_finished(server, clients, 240)

    events = EventAccumulator(str(board))
    events.Reload()
    expected = expected_metrics(state)
    keys = {k for values in expected.values() for k in values}
    assert set(events.Tags()["scalars"]) == keys
    seen: dict[int, dict[str, float]] = {}
    for key in keys:
        for e in events.Scalars(key):
            assert e.step not in seen.get(key, {}), f"{key} written twice at step {e.step}"
            seen.setdefault(e.step, {})[key] = e.value
    # TensorBoard stores float32: compare at that precision.
    assert seen.keys() == expected.keys()
    for r, values in expected.items():
        assert seen[r] == pytest.approx(values, rel=1e-6), r
    assert "parameters" in events.Tags()["tensors"]

    # A client's train metrics are what its receipts hold (what it reported), round by round.
    mine = EventAccumulator(str(tmp_path / "cl" / "client-0"))
    mine.Reload()
    with sqlite3.connect(state / "state.db") as db:
        rows = db.execute(
            "SELECT round, num_examples, metrics FROM receipts WHERE client_id = 'client-0'"
        ).fetchall()
    assert [r for r, _, _ in rows] == [1, 2, 3]
    for r, examples, metrics in rows:
        want = {f"train/{k}": v for k, v in json.loads(metrics).items()}
        want["train/num_examples"] = examples
        got = {k: next(e.value for e in mine.Scalars(k) if e.step == r) for k in want}
        assert got == pytest.approx(want, rel=1e-6), r
    assert {e.step for e in mine.Scalars("eval/accuracy")} == {1, 2, 3}


def test_a_dead_tracking_server_does_not_stop_the_federation(
    procs: list[Proc], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    from mlflow import MlflowClient

    url = mlflow_server.url
    state = tmp_path / "state"
    port = free_port()
    logs = tmp_path / "logs"
    flags = ("--rounds", "4", "--min-clients", "2", "--seed", "7", "--track-timeout", "5")
    server = start_serving(procs, logs, port, state, *flags, "--track", f"mlflow://{url}")
    # Slow clients (a round takes seconds): round 1 is tracked long before the last closes.
    clients = start_clients(procs, logs, port, 2, "--slowdown", "50")
    client = MlflowClient(tracking_uri=url)

    def round_one_tracked() -> bool:
        experiment = client.get_experiment_by_name("fedgrpc")
        if experiment is None:
            return False
        runs = client.search_runs([experiment.experiment_id])
        return bool(runs) and bool(
            client.get_metric_history(runs[0].info.run_id, ROUND_PREFIX + "participants")
        )

    wait_until(round_one_tracked, 120, "round 1 in MLflow")
    mlflow_server.kill()
    assert status_json(state)["rounds_completed"] < 4, "the tracker died after the last round"
    wait_finished(server, clients, 240)
    assert status_json(state)["rounds_completed"] == 4
    log = server.log()
    warnings = [line for line in log.splitlines() if "unreachable" in line and "tracking" in line]
    assert len(warnings) == 1, log  # once per outage, not once per round
    assert "WARNING" in warnings[0], warnings[0]
