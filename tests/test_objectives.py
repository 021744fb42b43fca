"""Task objectives: regression and binary metrics, and the diabetes example with real processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from examples.diabetes import DiabetesTask, target_std
from examples.diabetes import task as diabetes
from fedclient.metrics import MetricSums, align
from fedclient.partition import Partition
from fedclient.task import LocalData, Task, TrainConfig
from fedserver.state.history import read_status
from tests.procs import Proc, free_port, start_clients, start_serving, wait_finished

TASK = "examples.diabetes:task"
ROUNDS = 10
TARGET_R2 = 0.28  # closed-form least squares on the same split: 0.332
TARGET_MSE = 0.62  # in units of the pool's target variance


def test_regression_metrics_match_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, generator=g)
    pred = y + 0.3 * torch.randn(50, generator=g)
    sums = MetricSums("regression")
    for i in range(0, 50, 7):  # ragged batches give the same result
        out, tgt = align("regression", pred[i : i + 7, None], y[i : i + 7])
        sums.add(out, tgt, float(((out - tgt) ** 2).mean()))
    got = sums.result()
    err = (pred - y).numpy().astype(np.float64)
    yy = y.numpy().astype(np.float64)
    assert got["mse"] == pytest.approx((err**2).mean())
    assert got["loss"] == pytest.approx(got["mse"], rel=1e-5)
    assert got["mae"] == pytest.approx(np.abs(err).mean())
    assert got["r2"] == pytest.approx(1 - (err**2).sum() / ((yy - yy.mean()) ** 2).sum())


def test_binary_metrics_and_shape_checks() -> None:
    sums = MetricSums("binary")
    logits, targets = align("binary", torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 1, 0]))
    assert targets.dtype == torch.float32
    sums.add(logits, targets, 0.5)
    assert sums.result("train_") == {"train_loss": 0.5, "train_accuracy": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="do not match targets"):
        align("regression", torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="unknown objective"):
        MetricSums("ranking")


class _Separable(Task):
    """Binary task on two Gaussian blobs: the default loop must learn it with BCEWithLogits."""

    objective = "binary"

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(2, 1)

    def load_partition(self, partition: Partition) -> LocalData:
        g = torch.Generator().manual_seed(partition.index)
        y = torch.randint(0, 2, (200,), generator=g)
        x = torch.randn(200, 2, generator=g) + (y[:, None] * 2 - 1) * 1.5
        return LocalData(train=TensorDataset(x, y))


def test_binary_task_trains_with_default_loop() -> None:
    task = _Separable()
    assert isinstance(task.loss_fn(), torch.nn.BCEWithLogitsLoss)
    torch.manual_seed(0)
    model = task.build_model()
    data = task.load_partition(Partition(0, 1)).train
    result = task.train(model, data, TrainConfig(local_epochs=3, lr=0.1))
    assert set(result.metrics) == {"train_loss", "train_accuracy"}
    assert task.evaluate(model, data)["accuracy"] >= 0.9


def test_diabetes_uses_pool_statistics_only() -> None:
    x = diabetes.load_partition(Partition(0, 1)).train.tensors[0]
    test_x = diabetes.server_test_data().tensors[0]
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(10), atol=1e-4)
    assert not torch.allclose(test_x.mean(0), torch.zeros(10), atol=1e-3)  # not re-fitted
    assert target_std() > 1
    assert sum(len(diabetes.load_partition(Partition(i, 3)).train) for i in range(3)) == len(x)
    assert isinstance(DiabetesTask(hidden=8).build_model()[0], torch.nn.Linear)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_diabetes_regression_end_to_end(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    args = ("--rounds", str(ROUNDS), "--min-clients", "3")
    server = start_serving(procs, logs, port, state, *args, task=TASK)
    wait_finished(server, start_clients(procs, logs, port, 3, task=TASK), 120)

    model = diabetes.build_model()
    model.load_state_dict(load_file(state / "model.safetensors"))
    metrics = diabetes.evaluate(model, diabetes.server_test_data())
    print(f"diabetes after {ROUNDS} rounds: r2 {metrics['r2']:.4f} mse {metrics['mse']:.4f}")
    assert metrics["r2"] >= TARGET_R2
    assert metrics["mse"] <= TARGET_MSE
    last = read_status(state)["rounds"][-1]["metrics"]
    assert last["r2"] == pytest.approx(metrics["r2"], abs=1e-6)
    assert {"client_train_loss", "client_train_mse", "client_train_mae", "client_train_r2"} <= set(
        last
    )
