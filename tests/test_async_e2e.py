"""Asynchronous (FedBuff) aggregation end to end: real coordinator and client processes.

A raw gRPC client drives versions one by one to check staleness refusals, retries of updates
counted in a later round, and the metrics; a federation of 10 clients (3 of them 10x slower)
must reach the target accuracy and survive a kill -9 of the coordinator mid-run.
"""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, float_vector
from fedcore.wire import update_stream
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    scrape,
    start_client,
    start_coordinator,
    start_serving,
    status_json,
    wait_finished,
    wait_serving,
    wait_until,
)
from tests.raw_client import pull, update_header

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROUNDS = "fedgrpc_rounds_completed_total"


def submit(
    stub: pb_grpc.CoordinatorStub, client: str, round_number: int, model: FlatModel, value: float
) -> pb.SubmitReply:
    payload = np.full(float_vector(model).size, value, dtype="<f4").tobytes()
    header = update_header(client, round_number, model, len(payload))
    digest = hashlib.sha256(payload).hexdigest()
    return stub.SubmitUpdate(update_stream(header, payload, digest), timeout=60)


def test_stale_delta_is_refused_and_counted_and_late_retries_are_acknowledged(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port, metrics_port, state = free_port(), free_port(), tmp_path / "state"
    start_serving(
        procs, tmp_path / "logs", port, state, "--mode", "async", "--buffer-size", "1",
        "--max-staleness", "1", "--rounds", "4", "--min-clients", "1",
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Join(pb.JoinRequest(client_id="a"), timeout=10)
        models = {}
        for version in (1, 2):  # K = 1: every update publishes a version
            header, model = pull(stub, "a", wait_seconds=20, timeout=60)
            assert header.selected and header.round == version and model is not None
            assert header.config.extra["aggregation"] == "async"
            models[version] = model
            assert not submit(stub, "a", version, model, 0.001).duplicate
            wait_until(
                lambda v=version: scrape(metrics_port)[ROUNDS] == v, 60, f"version {version}"
            )

        # Round 3 is open; a delta based on round 1 is 2 versions old, more than S = 1.
        with pytest.raises(grpc.RpcError) as stale:
            submit(stub, "b", 1, models[1], 0.002)
        assert stale.value.code() is grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "--max-staleness 1" in stale.value.details()  # type: ignore[attr-defined]
        assert scrape(metrics_port)['fedgrpc_updates_rejected_total{reason="too_stale"}'] == 1

        # An id that never joined is refused like an unselected client of a synchronous round.
        with pytest.raises(grpc.RpcError) as stranger:
            submit(stub, "ghost", 2, models[2], 0.002)
        assert stranger.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "has not joined" in stranger.value.details()  # type: ignore[attr-defined]

        # One version old is allowed: counted in round 3, weighted, and recorded with its base
        # (b joins and pulls first: only a client handed the model holds a lease to submit).
        stub.Join(pb.JoinRequest(client_id="b"), timeout=10)
        assert pull(stub, "b", wait_seconds=20, timeout=60)[0].selected
        assert not submit(stub, "b", 2, models[2], 0.002).duplicate
        wait_until(lambda: scrape(metrics_port)[ROUNDS] == 3, 60, "version 3")
        # Retries of counted updates are acknowledged, also when counted in a later round.
        assert submit(stub, "a", 2, models[2], 0.001).duplicate
        assert submit(stub, "b", 2, models[2], 0.002).duplicate
        with pytest.raises(grpc.RpcError) as conflict:
            submit(stub, "b", 2, models[2], 0.003)
        assert conflict.value.code() is grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]

        metrics = scrape(metrics_port)
        assert metrics["fedgrpc_update_staleness_count"] == 3
        assert metrics['fedgrpc_update_staleness_bucket{le="0.0"}'] == 2
        assert metrics["fedgrpc_updates_expected"] == 1  # the buffer size
        live = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert live.rejections["too_stale"] == 1
    rounds = {r["round"]: r for r in status_json(state)["rounds"]}
    assert rounds[3]["metrics"]["staleness_max"] == 1
    assert rounds[2]["metrics"]["staleness_max"] == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--secure", "secagg"), "--mode async cannot be combined with --secure secagg"),
        (("--strategy", "median"), "--mode async cannot be combined with strategy median"),
        (("--staleness-weight", "linear"), "expected constant, poly:A or hinge:A,B"),
    ],
)
def test_async_refuses_what_it_cannot_do_at_startup(
    tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    state = tmp_path / "state"
    args = ["run", "--task", "examples.digits:task", "--state-dir", str(state), "--port", "0"]
    out = fedserver(*args, "--mode", "async", "--buffer-size", "2", *flags)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not (state / "state.db").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ("--max-staleness", "3"),
        ("--staleness-weight", "constant"),
        ("--max-concurrency", "4"),
        ("--max-contributions", "2"),
        ("--max-weight-ratio", "2"),
    ],
)
def test_async_flags_without_mode_async_are_refused_not_ignored(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    state = tmp_path / "state"
    args = ["run", "--task", "examples.digits:task", "--state-dir", str(state), "--port", "0"]
    out = fedserver(*args, *flags)
    assert out.returncode == 2, out.stderr
    assert f"{flags[0]} is for --mode async (this run is --mode fedavg)" in out.stderr
    assert not (state / "state.db").exists()


CLIENTS, SLOW = 10, 3
VERSIONS = 30
TARGET = 0.95


@pytest.mark.slow
@pytest.mark.timeout(600)  # 11 processes importing torch on a loaded 2-core machine
def test_async_reaches_target_with_slow_clients_and_survives_kill9(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """10 clients, 3 of them 10x slower; the coordinator is killed with an update counted in
    memory only, restarted, and finishes: no published version lost, accuracy >= 0.95."""
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    markers = tmp_path / "faults"
    markers.mkdir()
    flags = (
        "--mode", "async", "--buffer-size", "3", "--max-staleness", "8", "--rounds",
        str(VERSIONS), "--min-clients", "4",
    )  # fmt: skip
    crash_round = 6
    env = {"FEDGRPC_FAULT_DIR": str(markers), "FEDGRPC_FAULT": f"collect:{crash_round}"}
    server = start_coordinator(logs, port, state, *flags, name="server-0", env=env)
    procs.append(server)
    wait_serving(port, server)
    clients = []
    for i in range(CLIENTS):
        slow = ("--slowdown", "10") if i < SLOW else ()
        clients.append(start_client(logs, port, f"{i}/{CLIENTS}", *slow))
    procs.extend(clients)

    wait_until((markers / f"collect-{crash_round}.hit").exists, 240, "the crash point")
    server.kill()
    before = {r["round"]: r["model_version"] for r in status_json(state)["rounds"]}
    assert len(before) >= crash_round - 1

    server = start_coordinator(logs, port, state, *flags, name="server-1")
    procs.append(server)
    # The run must not wait for the slow clients: the fast ones finish it. (A slow client may
    # still be training when it ends; it then retries until --give-up-after, killed here.)
    wait_finished(server, clients[SLOW:], 300)

    after = status_json(state)
    versions = {r["round"]: r["model_version"] for r in after["rounds"]}
    assert sorted(versions) == list(range(1, VERSIONS + 1))
    assert {r: versions[r] for r in before} == before  # every published version kept
    accuracy = [r["metrics"]["accuracy"] for r in after["rounds"]]
    assert max(accuracy) >= TARGET  # reached
    # ... and kept: one version is 3 deltas, and one of them may come from a slow client up to
    # 8 versions stale, so single versions are noisy (loaded machines saw one dip to 0.883 after
    # 0.95, and a last five of [0.956, 0.911, 0.914, 0.919, 0.947]). The last five are judged
    # together: most of them (the median) must stay within 0.05 of the target. A real
    # degradation (lost versions, stale deltas weighted wrongly, divergence) pulls the majority
    # of the final versions well below 0.90.
    assert statistics.median(accuracy[-5:]) >= TARGET - 0.05, accuracy
    staleness = [r["metrics"]["staleness_max"] for r in after["rounds"]]
    assert max(staleness) <= 8
