"""What the coordinator records of each update is its own: a receipt's base round has its own
column (a client's metrics cannot make one update count twice), client metric names live under
their own prefix and never read as the coordinator's held-out accuracy or ε, reserved names are
refused, rounds.csv cannot carry a spreadsheet formula, and state dirs written before the
base_round column still resume."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.limits import CLIENT_METRIC_PREFIX, RESERVED_METRIC_NAMES
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, float_vector
from fedcore.wire import update_stream
from fedserver.commands.report import _write_csv
from fedserver.protocols import dp_ledger as dp
from fedserver.state.history import SCHEMA_VERSION, ClientReceipt, RoundRecord
from fedserver.state.store import StateStore
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    scrape,
    start_serving,
    status_json,
    wait_until,
)
from tests.raw_client import pull, update_header

BLIND = "tests.blind_task:task"
ROUNDS = "fedgrpc_rounds_completed_total"

# The receipts table as fedgrpc wrote it before SCHEMA_VERSION 1 (base_round in the metrics).
_OLD_RECEIPTS = """CREATE TABLE receipts (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (round, client_id)
)"""


def _record(round_number: int) -> RoundRecord:
    return RoundRecord(round_number, f"v{round_number}", 1, 10, {}, 0.0, 1.0, 1.0, 1)


def test_a_receipts_base_round_is_its_column_not_the_clients_metric(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    try:
        # Counted in round 2, trained on round 1's model; the client claims base_round 9.
        receipt = ClientReceipt("a", 10, "d-a", {"base_round": 9.0, "loss": 0.5}, 1)
        store.commit_round(_record(2), [receipt])
        assert store.receipt_digest(1, "a") == "d-a"
        assert store.receipt_digest(9, "a") is None
        assert store.receipt_digest(2, "a") is None
    finally:
        store.close()


def _downgrade(db_path: Path) -> None:
    """Rewrite state.db's receipts as fedgrpc did before the base_round column."""
    db = sqlite3.connect(db_path)
    with db:
        rows = db.execute(
            "SELECT round, client_id, num_examples, sha256, metrics, base_round FROM receipts"
        ).fetchall()
        db.execute("DROP TABLE receipts")
        db.execute(_OLD_RECEIPTS)
        for round_number, client, n, sha, metrics, base in rows:
            m = json.loads(metrics)
            if base != round_number:
                m["base_round"] = float(base)
            db.execute(
                "INSERT INTO receipts VALUES (?, ?, ?, ?, ?)",
                (round_number, client, n, sha, json.dumps(m)),
            )
        db.execute("PRAGMA user_version = 0")
    db.close()


def test_an_old_state_db_is_migrated_on_open(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.db")
    with db:
        db.execute("DROP TABLE receipts")
        db.execute(_OLD_RECEIPTS)
        db.executemany(
            "INSERT INTO receipts VALUES (?, ?, ?, ?, ?)",
            [
                (3, "async", 10, "d-async", json.dumps({"base_round": 2.0})),  # coordinator's
                (4, "liar", 10, "d-liar", json.dumps({"base_round": 99.0, "loss": 1.0})),
                (5, "plain", 10, "d-plain", "{}"),
            ],
        )
        db.execute("PRAGMA user_version = 0")
    db.close()
    store = StateStore(tmp_path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.receipt_digest(2, "async") == "d-async"
        assert store.receipt_digest(3, "async") is None
        # A client's number that the coordinator could not have written is not a base round.
        assert store.receipt_digest(4, "liar") == "d-liar"
        assert store.receipt_digest(99, "liar") is None
        assert store.receipt_digest(5, "plain") == "d-plain"
        store.commit_round(_record(6), [ClientReceipt("plain", 10, "d-6", {}, 6)])
        assert store.receipt_digest(6, "plain") == "d-6"
    finally:
        store.close()
    StateStore(tmp_path).close()  # opening a migrated dir again changes nothing


def test_coordinator_names_are_all_reserved() -> None:
    """Every name the coordinator writes itself into a round's record is refused from clients,
    bare (training metrics) and behind fed_ (federated evaluation: fed_examples, fed_clients)."""
    written = {dp.METRIC_EPSILON, dp.METRIC_DELTA, dp.METRIC_Z, dp.METRIC_Q, "base_round"}
    written |= {dp.METRIC_CLIP, dp.METRIC_CLIP_NEXT, dp.METRIC_UPDATE_Z, dp.METRIC_WITHIN}
    written |= {"staleness_mean", "staleness_max", "examples", "clients"}
    assert written <= RESERVED_METRIC_NAMES
    assert CLIENT_METRIC_PREFIX == "client_"


def test_rounds_csv_cells_never_start_a_formula(tmp_path: Path) -> None:
    hostile = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "fine"]
    rounds = [
        {
            "round": 1,
            "participants": 1,
            "num_examples": 10,
            "duration_seconds": 1.0,
            "metrics": {CLIENT_METRIC_PREFIX + n: -0.5 for n in hostile}
            | {n: 1.0 for n in hostile},
        }
    ]
    path = _write_csv(tmp_path / "rounds.csv", rounds)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    cells = [c for row in rows for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r")]
    assert not [c for c in cells if c.startswith("-") and c != "-0.5"]  # numbers stay numbers
    assert '\'=HYPERLINK("http://x","y")' in rows[0] and "fine" in rows[0]
    assert rows[1].count("-0.5") == len(hostile)


def _submit(
    stub: pb_grpc.CoordinatorStub,
    client: str,
    round_number: int,
    model: FlatModel,
    value: float,
    metrics: dict[str, float],
) -> pb.SubmitReply:
    payload = np.full(float_vector(model).size, value, dtype="<f4").tobytes()
    header = update_header(client, round_number, model, len(payload), metrics=metrics)
    digest = hashlib.sha256(payload).hexdigest()
    return stub.SubmitUpdate(update_stream(header, payload, digest), timeout=60)


def _refused(call: object, code: grpc.StatusCode) -> str:
    assert isinstance(call, grpc.RpcError)
    assert call.code() is code, call.details()  # type: ignore[attr-defined]
    return str(call.details())  # type: ignore[attr-defined]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_client_metrics_cannot_pose_as_the_coordinators_nor_count_an_update_twice(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port, metrics_port, state = free_port(), free_port(), tmp_path / "state"
    flags = ("--mode", "async", "--buffer-size", "1", "--max-staleness", "1")
    flags += ("--min-clients", "1", "--metrics-port", str(metrics_port))
    start_serving(procs, tmp_path / "logs", port, state, *flags, "--rounds", "2", task=BLIND)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for client in ("a", "b"):
            stub.Join(pb.JoinRequest(client_id=client), timeout=10)
        header, v1 = pull(stub, "a", wait_seconds=20, timeout=60)
        assert header.round == 1 and v1 is not None
        assert pull(stub, "b", wait_seconds=20, timeout=60)[0].round == 1  # b's lease on v1

        # A client that names its own base round (before: counted twice on version 1).
        for name in ("base_round", "epsilon"):
            with pytest.raises(grpc.RpcError) as e:
                _submit(stub, "a", 1, v1, 0.001, {name: 7.0})
            details = _refused(e.value, grpc.StatusCode.INVALID_ARGUMENT)
            assert f"metric name {name!r} is reserved" in details
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitEvaluation(
                pb.EvaluationResult(client_id="a", round=1, metrics={"examples": 1.0}), timeout=10
            )
        assert "metric name 'examples' is reserved" in _refused(
            e.value, grpc.StatusCode.INVALID_ARGUMENT
        )

        assert not _submit(stub, "a", 1, v1, 0.001, {"accuracy": 0.99}).duplicate
        wait_until(lambda: scrape(metrics_port)[ROUNDS] == 1, 60, "version 1")
        with pytest.raises(grpc.RpcError) as e:  # a second update on version 1
            _submit(stub, "a", 1, v1, 0.002, {"accuracy": 0.5})
        _refused(e.value, grpc.StatusCode.ALREADY_EXISTS)
        # b's update on version 1 is counted in round 2: its receipt's base round is 1.
        assert not _submit(stub, "b", 1, v1, 0.003, {}).duplicate
        wait_until(lambda: scrape(metrics_port)[ROUNDS] == 2, 60, "version 2")

        live = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        first = dict(next(r for r in live.rounds if r.round == 1).metrics)
        assert "accuracy" not in first
        assert first[CLIENT_METRIC_PREFIX + "accuracy"] == pytest.approx(0.99)
        assert not [k for k in scrape(metrics_port) if "accuracy" in k or "epsilon" in k]
    recorded = status_json(state)["rounds"][0]["metrics"]
    assert "accuracy" not in recorded and recorded[CLIENT_METRIC_PREFIX + "accuracy"] == 0.99
    shown = fedserver("status", "--state-dir", str(state)).stdout
    assert "privacy" not in shown
    columns, first_row = shown.splitlines()[1].split(), shown.splitlines()[2].split()
    assert "accuracy" not in columns
    assert first_row[columns.index(f"{CLIENT_METRIC_PREFIX}accuracy")] == "0.99"
    for proc in procs:
        proc.kill()

    # A state dir from before the base_round column resumes: b's retry on version 1, counted
    # in round 2, is still recognised, and the run goes on to round 3.
    _downgrade(state / "state.db")
    start_serving(procs, tmp_path / "logs2", port, state, *flags, "--rounds", "3", task=BLIND)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Join(pb.JoinRequest(client_id="b"), timeout=10)
        assert _submit(stub, "b", 1, v1, 0.003, {}).duplicate
        header, v3 = pull(stub, "b", wait_seconds=20, timeout=60)
        assert header.round == 3 and v3 is not None
        assert not _submit(stub, "b", 3, v3, 0.001, {}).duplicate
        wait_until(lambda: status_json(state)["rounds_completed"] == 3, 60, "round 3")
