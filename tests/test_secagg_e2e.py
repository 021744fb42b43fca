"""Secure aggregation end to end: a real coordinator and real client processes over gRPC.

Each round's global model must equal FedAvg of the contributing clients' updates within the
fixed-point error (2^-25 per coordinate, plus float32 rounding). The expected FedAvg is recomputed
here with the clients' own deterministic local training (same seeds, one torch thread) starting
from the round's actual base checkpoint, so no second (plain) federation is needed.

Dropouts are not timed: FEDGRPC_FAULT=upload:1 stalls a client process right after the first
chunk of its masked update is on the wire (after key exchange and masking); the test sees the
fault's marker file and kill -9s it there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from examples.digits import task
from fedclient.local_update import round_seed
from fedclient.partition import Partition
from fedclient.task import TrainConfig
from fedcore.secagg import quantize
from fedcore.tensors import flatten_state_dict, float_vector, to_state_dict
from tests.procs import (
    Proc,
    free_port,
    start_client,
    start_clients,
    start_serving,
    status_json,
    wait_finished,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def _checkpoint(state: Path, round_number: int) -> np.ndarray:
    model = task.build_model()
    model.load_state_dict(
        load_file(state / "checkpoints" / f"round-{round_number:04d}.safetensors")
    )
    return float_vector(flatten_state_dict(model.state_dict())).astype(np.float64)


def _fedavg(state: Path, round_number: int, n: int, clients: list[int]) -> np.ndarray:
    """base + example-weighted mean of the clients' deltas, trained exactly as they did."""
    model = task.build_model()
    model.load_state_dict(
        load_file(state / "checkpoints" / f"round-{round_number - 1:04d}.safetensors")
    )
    base = flatten_state_dict(model.state_dict())
    defaults = task.default_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the clients ran with --threads 1
    try:
        total, weight = np.zeros(float_vector(base).size, np.float64), 0
        for i in clients:
            data = task.load_partition(Partition.parse(f"{i}/{n}", scheme="iid", seed=0))
            config = TrainConfig(
                local_epochs=1,
                lr=defaults.lr,
                batch_size=defaults.batch_size,
                seed=round_seed(0, f"client-{i}", round_number),
                extra={"secagg": "1", "secagg_weighted": "1"},
            )
            torch.manual_seed(config.seed)
            model.load_state_dict(to_state_dict(base))
            result = task.train(model, data.train, config)
            delta = float_vector(flatten_state_dict(model.state_dict())) - float_vector(base)
            total += delta.astype(np.float64) * result.num_examples
            weight += result.num_examples
    finally:
        torch.set_num_threads(threads)
    return float_vector(base).astype(np.float64) + total / weight


def _assert_fedavg(state: Path, round_number: int, n: int, clients: list[int]) -> None:
    got = _checkpoint(state, round_number)
    diff = np.abs(got - _fedavg(state, round_number, n, clients)).max()
    assert diff <= quantize.ERROR_BOUND + 2**-22, (round_number, diff)


def test_secagg_model_equals_fedavg(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, "--rounds", "2", "--min-clients", "3", "--local-epochs", "1",
        "--secure", "secagg",
    )  # fmt: skip
    clients = start_clients(procs, logs, port, 3)
    wait_finished(server, clients, 200)
    assert "secure aggregation with 2 peers (threshold 2)" in clients[0].log()
    assert [r["participants"] for r in status_json(state)["rounds"]] == [3, 3]
    for r in (1, 2):
        _assert_fedavg(state, r, 3, [0, 1, 2])


def test_two_of_eight_killed_after_masking(tmp_path: Path, procs: list[Proc]) -> None:
    n, dropped = 8, {3, 6}
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    markers = {i: tmp_path / f"faults-{i}" for i in dropped}
    for d in markers.values():
        d.mkdir()
    # The two dead clients stay selected: the round closes once both have been silent for
    # --client-timeout (the 45 s deadline is only the fallback), and the linger need not wait
    # for them either. Live clients stay heard: heartbeats every 10/3 s while training, and
    # stage long-polls of --poll-seconds 3 while waiting for their peers.
    server = start_serving(
        procs, logs, port, state, "--rounds", "1", "--min-clients", str(n), "--min-fit", "6",
        "--local-epochs", "1", "--round-timeout", "45", "--secure", "secagg",
        "--client-timeout", "10",
    )  # fmt: skip
    clients = {}
    for i in range(n):
        fault = {"FEDGRPC_FAULT": "upload:1", "FEDGRPC_FAULT_DIR": str(markers.get(i, ""))}
        env = fault if i in dropped else None
        clients[i] = start_client(logs, port, f"{i}/{n}", "--poll-seconds", "3", env=env)
    procs.extend(clients.values())
    for i in dropped:  # masked and mid-upload: kill -9 exactly there
        wait_until(lambda i=i: (markers[i] / "upload-1.hit").exists(), 240, f"client {i} upload")
        clients[i].kill()
        assert clients[i].popen.returncode == -9
        assert "secure aggregation with 7 peers (threshold 5)" in clients[i].log()
    wait_finished(server, [c for i, c in clients.items() if i not in dropped], 240)
    assert "2 dropped after the key exchange" in server.log()
    assert [r["participants"] for r in status_json(state)["rounds"]] == [n - len(dropped)]
    _assert_fedavg(state, 1, n, [i for i in range(n) if i not in dropped])
