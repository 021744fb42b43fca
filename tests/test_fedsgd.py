"""FedSGD mode: clients send one gradient; the coordinator applies the average with --server-lr."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.digits import task
from fedclient.local_update import gradient_vector
from fedclient.partition import Partition
from fedclient.task import TrainConfig
from fedcore.tensors import flatten_state_dict
from fedserver.state.history import read_status
from tests.procs import Proc, free_port, start_clients, start_serving, wait_finished

ROUNDS = 50
SERVER_LR = 1.0
TARGET_ACCURACY = 0.94  # bench/fedsgd_vs_fedavg.py: 0.95 at round 50 with these settings


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return task.build_model()


def test_gradient_is_the_full_batch_mean_whatever_the_slicing() -> None:
    data = task.load_partition(Partition(0, 3)).train
    x, y = data.tensors
    reference = _model()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    want = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    for batch in (7, 32, 10_000):
        model = _model()
        before = flatten_state_dict(model.state_dict())
        result = task.compute_gradient(model, data, TrainConfig(batch_size=batch))
        assert result.num_examples == len(data)
        assert set(result.metrics) == {"train_loss", "train_accuracy"}
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert flatten_state_dict(model.state_dict()).version == before.version  # not stepped
        vector = gradient_vector(model, before.manifest.floats())
        torch.testing.assert_close(torch.from_numpy(vector), got)


def test_gradient_batch_samples_a_seeded_subset() -> None:
    data = task.load_partition(Partition(0, 3)).train
    config = TrainConfig(seed=5, extra={"mode": "fedsgd", "gradient_batch": "40"})
    assert (config.mode, config.gradient_batch) == ("fedsgd", 40)
    grads = []
    for seed in (5, 5, 6):
        model = _model()
        cfg = TrainConfig(seed=seed, extra=dict(config.extra))
        assert task.compute_gradient(model, data, cfg).num_examples == 40
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], grads[2])
    with pytest.raises(ValueError, match="fedavg or fedsgd"):
        _ = TrainConfig(extra={"mode": "sgd"}).mode


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_fedsgd_end_to_end(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    args = ("--rounds", str(ROUNDS), "--min-clients", "3", "--mode", "fedsgd")
    server = start_serving(procs, logs, port, state, *args, "--server-lr", str(SERVER_LR))
    clients = start_clients(procs, logs, port, 3)
    wait_finished(server, clients, 200)
    assert all("computed a gradient" in client.log() for client in clients)

    model = task.build_model()
    model.load_state_dict(load_file(state / "model.safetensors"))
    accuracy = task.evaluate(model, task.server_test_data())["accuracy"]
    status = read_status(state)
    update_bytes = 4 * sum(p.numel() for p in model.parameters())
    received = sum(r["bytes_in"] for r in status["rounds"])
    print(f"fedsgd: accuracy {accuracy:.4f} after {ROUNDS} rounds, {received} update bytes")
    assert accuracy >= TARGET_ACCURACY
    assert all(r["participants"] == 3 for r in status["rounds"])
    assert received == ROUNDS * 3 * update_bytes  # one fp32 gradient per client per round
