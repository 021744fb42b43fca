"""--track end to end: a real coordinator and clients on examples.digits, tracked into a real
MLflow server (its own process, SQLite backend) and into TensorBoard event files, each read
back with the tracker's own reader and compared with `fedserver status --json`."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fedserver.tracking import ROUND_PREFIX
from tests.procs import (
    Proc,
    free_port,
    spawn,
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


def start_mlflow(procs: list[Proc], tmp_path: Path) -> str:
    """`mlflow server` on a free loopback port, SQLite backend, one worker; its URL once its
    health endpoint answers."""
    port = free_port()
    args = [
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination",
        str(tmp_path / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = spawn("mlflow", args, tmp_path / "logs")
    procs.append(server)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if server.popen.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    wait_until(healthy, 120, "the MLflow server's /health")
    return url


def mlflow_metrics(client: Any, run_id: str, keys: set[str]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            assert m.step not in out.get(key, {}), f"{key} logged twice at step {m.step}"
            out.setdefault(m.step, {})[key] = m.value
    return out


def test_mlflow_run_matches_status(procs: list[Proc], tmp_path: Path) -> None:
    url = start_mlflow(procs, tmp_path)
    state = tmp_path / "state"
    port = free_port()
    logs = tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, *FLAGS, "--track", f"mlflow://{url}", "--track-model"
    )
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
    assert params["rounds.total_rounds"] == "3"
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
