"""Bulyan and q-FedAvg in real federations: coordinator and clients as processes over gRPC.

- q-FedAvg against one raw client: the round config asks for the loss, an update without it
  (or with a negative one) is refused with INVALID_ARGUMENT and changes nothing, and a valid
  one moves the model by exactly the paper's step.
- Bulyan with 7 fedclient processes, one of them sending -10 x its honest delta (the
  tests/byzantine_task.py attacker of tests/test_byzantine.py), f = 1: the model still learns.
- q-FedAvg with 3 fedclient processes on label-skewed digits: the clients report the loss of
  the model they received, and the federation learns.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.tensors import float_vector
from tests.procs import (
    Proc,
    free_port,
    start_client,
    start_clients,
    start_serving,
    status_json,
    wait_finished,
)
from tests.raw_client import lone_client, pull, update_header
from tests.test_bad_input import stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
LOSS = "loss_before_training"
TRAINING = ("--local-epochs", "20", "--lr", "0.2", "--batch-size", "256")  # as test_byzantine


def test_qfedavg_asks_for_the_loss_refuses_updates_without_it_and_steps_exactly(
    tmp_path: Path,
) -> None:
    q, lr, loss = 0.5, 0.2, 1.7
    flags = ("--strategy", "qfedavg", "--q-param", str(q), "--qffl-learning-rate", str(lr))
    with lone_client(tmp_path, "tester", "--rounds", "2", *flags) as joined:
        header, model, stub = joined.header, joined.model, joined.stub
        assert header.config.extra[LOSS] == "1"
        delta = np.linspace(-0.1, 0.1, float_vector(model).size, dtype="<f4")
        payload = delta.tobytes()
        before = (tmp_path / "state" / "model.safetensors").read_bytes()
        for metrics, says in [
            ({"train_loss": 0.3}, "reads metric loss_before_training of every update"),
            ({LOSS: -1.0}, "needs loss_before_training >= 0, got -1.0"),
        ]:
            h = update_header("tester", header.round, model, len(payload), metrics=metrics)
            with pytest.raises(grpc.RpcError) as info:
                stub.SubmitUpdate(stream(h, payload), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert says in info.value.details()  # type: ignore[attr-defined]
        assert (tmp_path / "state" / "model.safetensors").read_bytes() == before

        h = update_header("tester", header.round, model, len(payload), metrics={LOSS: loss})
        assert stub.SubmitUpdate(stream(h, payload), timeout=30).accepted
        after, new_model = pull(stub, "tester")
        assert after.round == header.round + 1 and new_model is not None
    # One client: h = q F^(q-1) |D|^2 / lr^2 + F^q / lr, x + F^q D / (lr h).
    f = loss + 1e-10
    sq = float((delta.astype(np.float64) ** 2).sum())
    c = f**q / (lr * (q * f ** (q - 1) * sq / lr**2 + f**q / lr))
    want = float_vector(model) + (c * delta.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(float_vector(new_model), want, rtol=0, atol=1e-7)


@pytest.mark.slow
def test_bulyan_federation_learns_despite_a_sign_flipping_client(
    tmp_path: Path, procs: list[Proc]
) -> None:
    clients, rounds = 7, 5
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, "--rounds", str(rounds), "--min-clients", str(clients),
        "--strategy", "bulyan", "--bulyan-byzantine", "1", "--round-timeout", "120", *TRAINING,
    )  # fmt: skip
    started = [start_client(logs, port, f"0/{clients}", task="tests.byzantine_task:attacker")]
    started += [start_client(logs, port, f"{i}/{clients}") for i in range(1, clients)]
    procs.extend(started)
    wait_finished(server, started, 240)
    status = status_json(state)
    assert status["strategy"] == "bulyan"
    history = status["rounds"]
    assert len(history) == rounds and all(r["participants"] == clients for r in history)
    accuracy = [r["metrics"]["accuracy"] for r in history]
    print("bulyan accuracy by round", [round(a, 3) for a in accuracy])
    assert accuracy[-1] >= 0.9


@pytest.mark.slow
def test_qfedavg_federation_reports_the_loss_of_the_received_model_and_learns(
    tmp_path: Path, procs: list[Proc]
) -> None:
    # --qffl-learning-rate 4 = 20 full-batch steps x lr 0.2: g_k = D_k / 4 is then about one
    # gradient (docs/algorithms.md). In-process with these settings: 0.917 after round 5.
    clients, rounds = 3, 5
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, "--rounds", str(rounds), "--min-clients", str(clients),
        "--strategy", "qfedavg", "--q-param", "0.2", "--qffl-learning-rate", "4", *TRAINING,
    )  # fmt: skip
    started = start_clients(procs, logs, port, clients, "--partitioner", "dirichlet")
    wait_finished(server, started, 240)
    history = status_json(state)["rounds"]
    assert len(history) == rounds
    losses = [r["metrics"]["client_" + LOSS] for r in history]
    accuracy = [r["metrics"]["accuracy"] for r in history]
    print("qfedavg loss before training", [round(v, 3) for v in losses], "accuracy", accuracy)
    # Round 1's loss is the untrained model's (about ln 10); later rounds start from better ones.
    assert losses[0] > 2.0 and losses[-1] < losses[0] / 2
    assert accuracy[-1] >= 0.85
