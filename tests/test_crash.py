"""kill -9 the coordinator at four points of a round, restart it on the same state dir each time.

The same three client processes run throughout (never restarted): they ride out every crash
by retrying, and the federation still finishes every round exactly once with intact
checkpoints. The fault hook (fedcore/faults.py) freezes the coordinator at the exact point and
writes a marker file, so each kill lands where it is meant to.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from examples.digits import task
from fedcore.files import read_safetensors
from fedcore.tensors import to_state_dict
from tests.procs import (
    Proc,
    free_port,
    start_clients,
    start_coordinator,
    status_json,
    wait_finished,
    wait_serving,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ROUNDS = 5
CLIENTS = 3
# (fault point, round): where each successive coordinator process is killed.
CRASHES = [("collect", 2), ("aggregate", 3), ("checkpoint", 4), ("commit", 5)]
TARGET_ACCURACY = 0.9


def test_kill9_coordinator_at_every_stage_loses_nothing(tmp_path: Path, procs: list[Proc]) -> None:
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    markers = tmp_path / "faults"
    markers.mkdir()
    flags = ("--rounds", str(ROUNDS), "--min-clients", str(CLIENTS), "--round-timeout", "60")

    def coordinator(n: int) -> Proc:
        env = {"FEDGRPC_FAULT_DIR": str(markers)}
        if n < len(CRASHES):
            env["FEDGRPC_FAULT"] = "{}:{}".format(*CRASHES[n])
        proc = start_coordinator(logs, port, state, *flags, name=f"server-{n}", env=env)
        procs.append(proc)
        return proc

    server = coordinator(0)
    wait_serving(port, server)
    clients = start_clients(procs, logs, port, CLIENTS)

    resume_seconds = []
    for n, (point, round_number) in enumerate(CRASHES):
        marker = markers / f"{point}-{round_number}.hit"
        wait_until(marker.exists, 120, f"coordinator {n} to reach {point} in round {round_number}")
        half_written = list((state / "checkpoints").glob(".*.tmp"))
        server.kill()
        assert server.popen.returncode == -9
        assert (point == "checkpoint") == bool(half_written), half_written
        # Killed before the round's commit: exactly the earlier rounds are on record.
        assert status_json(state)["rounds_completed"] == round_number - 1

        started = time.monotonic()
        server = coordinator(n + 1)
        wait_until(lambda s=server: "listening" in s.log(), 120, "the coordinator to listen")
        listening = time.monotonic()
        opened = f"round {round_number}/{ROUNDS} opened"
        wait_until(lambda s=server, o=opened: o in s.log(), 120, f"round {round_number} to re-open")
        resume_seconds.append((listening - started, time.monotonic() - started))
        # The torn write is gone (a new round may already be writing its own temp file).
        assert not any(p.exists() for p in half_written)

    wait_finished(server, clients, 180)
    for client in clients:
        assert client.popen.pid in {c.popen.pid for c in clients}
        # One process, one federation: it joined once and never saw a new federation id.
        assert client.log().count("joined federation") == 1, client.log()
        assert "training is finished" in client.log()

    status = status_json(state)
    assert status["status"] == "finished"
    assert [r["round"] for r in status["rounds"]] == list(range(1, ROUNDS + 1))  # no gap, no repeat
    assert all(r["participants"] == CLIENTS for r in status["rounds"])
    attempts = {r["round"]: r["attempts"] for r in status["rounds"]}
    assert set(attempts.values()) == {1}, attempts

    names = sorted(p.name for p in (state / "checkpoints").iterdir())
    assert names == [f"round-{r:04d}.safetensors" for r in range(ROUNDS + 1)]
    versions = {r["round"]: r["model_version"] for r in status["rounds"]}
    for r in range(ROUNDS + 1):
        model, meta = read_safetensors(state / "checkpoints" / f"round-{r:04d}.safetensors")
        assert meta["model_version"] == model.version
        if r:
            assert versions[r] == model.version
    published, _ = read_safetensors(state / "model.safetensors")
    assert published.version == versions[ROUNDS]

    net = task.build_model()
    net.load_state_dict(to_state_dict(published))
    accuracy = task.evaluate(net, task.server_test_data())["accuracy"]
    assert accuracy >= TARGET_ACCURACY
    shown = ", ".join(
        f"{p}: {up:.1f}/{back:.1f}"
        for (p, _), (up, back) in zip(CRASHES, resume_seconds, strict=True)
    )
    print(
        f"\nresume after kill -9, seconds (restart -> listening / restart -> round re-opened with "
        f"all clients back): {shown}; final accuracy {accuracy:.4f}"
    )


@pytest.mark.timeout(180)
def test_next_round_runs_while_the_checkpoint_is_written_and_waits_for_it(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """A closed round's checkpoint and commit run while the next round collects: frozen
    halfway through round 1's checkpoint, the coordinator has round 2 open and its updates in,
    but round 2 cannot close, and nothing is on record, until round 1 is committed."""
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    markers = tmp_path / "faults"
    markers.mkdir()
    env = {"FEDGRPC_FAULT": "checkpoint:1", "FEDGRPC_FAULT_DIR": str(markers)}
    flags = ("--rounds", "3", "--min-clients", "2", "--round-timeout", "60")
    server = start_coordinator(logs, port, state, *flags, env=env)
    procs.append(server)
    wait_serving(port, server)
    start_clients(procs, logs, port, 2)
    wait_until((markers / "checkpoint-1.hit").exists, 120, "round 1's checkpoint to start")
    wait_until(lambda: "round 2/3 opened" in server.log(), 60, "round 2 to open")
    wait_until(lambda: "round 2: update 2/2" in server.log(), 60, "round 2's updates")
    assert "round 1/3 closed" in server.log() and "round 2/3 closed" not in server.log()
    assert status_json(state)["rounds_completed"] == 0
    server.kill()
