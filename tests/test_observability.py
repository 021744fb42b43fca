"""Metrics, live status, JSON logs and reports of a real coordinator.

The test drives the rounds itself (one raw gRPC client, --min-clients 1), so it can scrape
/metrics at known points: before any round, after a refused update, after each round.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, float_vector
from fedcore.wire import update_stream
from tests.procs import Proc, fedserver, free_port, scrape, start_serving, wait_until
from tests.raw_client import pull, update_header

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]
CLIENT = "probe"


def submit(
    stub: pb_grpc.CoordinatorStub, header: pb.ModelHeader, model: FlatModel, **kw: int
) -> None:
    payload = np.full(float_vector(model).size, 0.001, dtype="<f4").tobytes()
    update = update_header(CLIENT, header.round, model, len(payload), **kw)
    digest = hashlib.sha256(payload).hexdigest()
    stub.SubmitUpdate(update_stream(update, payload, digest), timeout=60)


def test_metrics_status_logs_and_report(tmp_path: Path, procs: list[Proc]) -> None:
    port, metrics_port = free_port(), free_port()
    state = tmp_path / "state"
    server = start_serving(
        procs, tmp_path / "logs", port, state, "--rounds", "2", "--min-clients", "1",
        "--round-timeout", "600", "--metrics-port", str(metrics_port), "--log-format", "json",
    )  # fmt: skip
    rounds = "fedgrpc_rounds_completed_total"
    rejected = 'fedgrpc_updates_rejected_total{reason="bad_num_examples"}'
    assert scrape(metrics_port)[rounds] == 0

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Join(pb.JoinRequest(client_id=CLIENT), timeout=10)
        header, model = pull(stub, CLIENT, wait_seconds=20, timeout=60)
        assert header.selected and model is not None
        with pytest.raises(grpc.RpcError) as bad:
            submit(stub, header, model, num_examples=0)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        after_bad = scrape(metrics_port)
        assert after_bad[rejected] == 1
        assert after_bad[rounds] == 0
        assert after_bad["fedgrpc_current_round"] == 1
        assert after_bad["fedgrpc_model_bytes_sent_total"] == model.buffer.size

        live = json.loads(fedserver("status", "--server", f"127.0.0.1:{port}", "--json").stdout)
        assert (live["status"], live["current_round"], live["total_rounds"]) == ("training", 1, 2)

        submit(stub, header, model)
        wait_until(lambda: scrape(metrics_port)[rounds] == 1, 60, "round 1 in /metrics")
        first = scrape(metrics_port)
        assert first["fedgrpc_updates_accepted_total"] == 1
        assert first["fedgrpc_round_participants"] == 1
        assert first["fedgrpc_round_duration_seconds_count"] == 1
        assert first["fedgrpc_aggregation_duration_seconds_count"] == 1
        assert first["fedgrpc_update_bytes_received_total"] > 0

        header, model = pull(stub, CLIENT, wait_seconds=20, timeout=60)
        assert header.selected and model is not None
        assert header.round == 2
        submit(stub, header, model)
        wait_until(lambda: scrape(metrics_port)[rounds] == 2, 60, "round 2 in /metrics")
        assert scrape(metrics_port)[rejected] == 1
    assert server.wait(60) == 0, server.log()

    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any("round 2/2 closed" in entry["message"] for entry in lines)
    assert {"ts", "level", "logger", "message"} <= lines[0].keys()

    status = json.loads(fedserver("status", "--state-dir", str(state), "--json").stdout)
    assert [r["bytes_out"] for r in status["rounds"]] == [model.buffer.size] * 2

    out = tmp_path / "report"
    made = fedserver("report", "--state-dir", str(state), "--out", str(out))
    assert made.returncode == 0, made.stderr
    for name in ("accuracy", "loss", "participants", "bytes"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(int(r["participants"]) == 1 and 0 < float(r["accuracy"]) <= 1 for r in rows)
    assert json.loads((out / "report.json").read_text())["rounds_completed"] == 2
