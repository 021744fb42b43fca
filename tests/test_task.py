"""The Task defaults, exercised on the bundled digits example."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from examples.digits import DigitsTask, task
from fedclient.partition import Partition
from fedclient.task import LocalData, Task, TrainConfig, TrainResult


def _fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return task.build_model()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_central_training_reaches_95_percent() -> None:
    model = _fresh_model()
    data = task.load_partition(Partition(0, 1))
    result = task.train(model, data.train, TrainConfig(local_epochs=10, lr=0.05, seed=0))
    assert result.num_examples == len(data.train)
    assert set(result.metrics) == {"train_loss", "train_accuracy"}
    assert task.evaluate(model, task.server_test_data())["accuracy"] >= 0.95


def test_same_seeds_give_bit_identical_weights() -> None:
    data = task.load_partition(Partition(1, 3, scheme="dirichlet", alpha=0.3))
    config = TrainConfig(local_epochs=2, seed=3, extra={"proximal_mu": "0.1"})
    states = []
    for _ in range(2):
        model = _fresh_model(seed=11)
        task.train(model, data.train, config)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_shuffle_seed_matters() -> None:
    data = task.load_partition(Partition(0, 3))
    runs = []
    for seed in (0, 1):
        model = _fresh_model()
        task.train(model, data.train, TrainConfig(seed=seed))
        runs.append(_flat(model))
    assert not torch.equal(runs[0], runs[1])


def test_proximal_term_limits_drift() -> None:
    data = task.load_partition(Partition(0, 3, scheme="dirichlet", alpha=0.1))
    start = _flat(_fresh_model())
    drift = {}
    for mu in ("0", "10"):
        model = _fresh_model()
        task.train(model, data.train, TrainConfig(local_epochs=3, extra={"proximal_mu": mu}))
        drift[mu] = torch.linalg.vector_norm(_flat(model) - start).item()
    assert drift["10"] < 0.5 * drift["0"]


def test_evaluate_returns_bounded_metrics_and_restores_mode() -> None:
    model = _fresh_model()
    model.train()
    metrics = task.evaluate(model, task.server_test_data(), batch_size=64)
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert model.training


def test_evaluate_is_example_weighted_across_batch_sizes() -> None:
    model = _fresh_model()
    whole = task.evaluate(model, task.server_test_data(), batch_size=1000)
    ragged = task.evaluate(model, task.server_test_data(), batch_size=7)
    assert whole["accuracy"] == ragged["accuracy"]
    assert whole["loss"] == pytest.approx(ragged["loss"], rel=1e-5)


def test_digits_partitions_and_held_out_split() -> None:
    test_set = task.server_test_data()
    assert len(test_set) == 360
    parts = [task.load_partition(Partition(i, 3)) for i in range(3)]
    assert sum(len(p.train) + len(p.test or ()) for p in parts) == 1797 - 360
    for part in parts:
        assert part.test is not None
        assert len(part.test) == round(0.1 * (len(part.train) + len(part.test)))
        x, y = part.train[0]
        assert x.dtype == torch.float32 and x.shape == (64,) and 0.0 <= x.min() <= x.max() <= 1.0
        assert y.dtype == torch.int64


def test_digits_is_configurable() -> None:
    torch.manual_seed(0)
    model = DigitsTask(hidden=16).build_model()
    assert sum(p.numel() for p in model.parameters()) == 64 * 16 + 16 + 16 * 10 + 10
    with pytest.raises(ValueError, match="hidden"):
        DigitsTask(hidden=0)


def test_train_config_is_frozen_and_validated() -> None:
    knobs = {"proximal_mu": "0.5"}
    config = TrainConfig(extra=knobs)
    knobs["proximal_mu"] = "9"
    assert config.proximal_mu == 0.5
    with pytest.raises(TypeError):
        config.extra["proximal_mu"] = "1"  # type: ignore[index]
    with pytest.raises(ValueError, match="proximal_mu"):
        _ = TrainConfig(extra={"proximal_mu": "lots"}).proximal_mu
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_minimal_subclass_uses_defaults() -> None:
    class Tiny(Task):
        def build_model(self) -> torch.nn.Module:
            return torch.nn.Linear(2, 2)

        def load_partition(self, partition: Partition) -> LocalData:
            x = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 8)
            return LocalData(train=TensorDataset(x, torch.tensor([1, 0] * 8)))

    tiny = Tiny()
    assert tiny.server_test_data() is None
    torch.manual_seed(0)
    model = tiny.build_model()
    data = tiny.load_partition(Partition(0, 1)).train
    result = tiny.train(model, data, TrainConfig(local_epochs=20, lr=0.5, batch_size=4))
    assert isinstance(result, TrainResult) and result.num_examples == 16
    assert tiny.evaluate(model, data)["accuracy"] == 1.0


def test_task_requires_the_abstract_methods() -> None:
    with pytest.raises(TypeError):
        Task()  # type: ignore[abstract]


def test_optimizer_warm_up_only_for_tasks_that_build_one() -> None:
    """fedclient warms torch.optim up before joining (it imports torch._dynamo, ~73 MB) only
    where training will build an optimizer through make_optimizer: the default loop, or a task
    that defines its own. A task with its own loop and no make_optimizer (bench.large_task's
    no-train task) is spared the import, which kept a 2.2 GB model's fedclient 60 MB over
    issue 23's 2 x model + 300 MB."""
    from bench.large_task import NoTrainTask
    from fedclient.task import trains_with_make_optimizer

    class OwnLoopOwnOptimizer(NoTrainTask):
        def make_optimizer(self, model: torch.nn.Module, config: TrainConfig) -> torch.optim.SGD:
            return torch.optim.SGD(model.parameters(), lr=config.lr)

    assert trains_with_make_optimizer(task)  # digits: the default loop
    assert trains_with_make_optimizer(OwnLoopOwnOptimizer(8))
    assert not trains_with_make_optimizer(NoTrainTask(8))
