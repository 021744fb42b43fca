"""Synthetic(alpha, beta) of FedProx as a Task: multinomial logistic regression, 60 -> 10.

Every virtual client k holds device k's own data (examples/synthetic_data.py), so 10,000
clients hold 10,000 different, non-IID data sets and the data grows with the federation, not
the process: a worker generates a device's few hundred examples when that client trains. The
partition's scheme is irrelevant (the data is non-IID by construction); its index is the
device. The coordinator's held-out set is the local test splits of the first TEST_DEVICES
devices: examples no client trains on, from the same population of devices.

    fedserver simulate --task examples.synthetic:task --clients 1000 --clients-per-round 50
    (also synthetic_0_0, synthetic_05_05, synthetic_1_1 and synthetic_iid: the paper's settings,
    and synthetic_iid_05: one model for all devices, inputs and sizes still non-IID)

Labels do not depend on alpha: u_k shifts every logit of device k by the same amount, and argmax
ignores that. What makes Synthetic(alpha, beta) non-IID is that W_k is drawn afresh for every
device, so a device's labels share nothing with another's; one global model can only learn each
device's cluster (x ~ v_k) -> label map, visiting devices as they are sampled. synthetic_iid_05
keeps the skew of inputs (v_k = B_k * 1, B_k ~ N(0, 0.5)) and of sizes but shares W, b: a task a
global model can learn, as tests/test_simulation.py checks with 1,000 clients.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from examples.synthetic_data import DIMENSION, NUM_CLASSES, device_data, pooled_test
from fedclient.partition import Partition
from fedclient.task import LocalData, Task, TrainConfig, TrainResult
from fedcore.tensors import FlatModel, Manifest, TensorSpec

__all__ = ["SyntheticTask", "task"]

TEST_DEVICES = 200


class SyntheticTask(Task):
    def __init__(
        self, alpha: float = 0.5, beta: float = 0.5, data_seed: int = 0, iid: bool = False
    ) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.data_seed, self.iid = alpha, beta, data_seed, iid

    def default_config(self) -> TrainConfig:
        # The paper's batch 10 and lr 0.01 (plain SGD, make_optimizer), 2 local epochs instead
        # of 20 to keep 10,000-client benchmarks affordable.
        return TrainConfig(local_epochs=2, lr=0.01, batch_size=10)

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(DIMENSION, NUM_CLASSES)

    def initial_model(self, seed: int) -> FlatModel:
        """All zeros, as in the paper (and convex: the start does not matter)."""
        return FlatModel.zeros(
            Manifest(
                (
                    TensorSpec("weight", "float32", (NUM_CLASSES, DIMENSION)),
                    TensorSpec("bias", "float32", (NUM_CLASSES,)),
                )
            )
        )

    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        """Minibatch SGD with softmax cross-entropy's gradient written out,
        X^T (softmax(X W^T + b) - onehot(y)) / n, in numpy on views of the model's tensors.
        For a 610-parameter model, torch's per-operation dispatch and the autograd graph cost
        more than the arithmetic (a device's 2 epochs of 12 batches: 16 ms with autograd, 3 ms
        here, the same weights to 3e-8), and this task exists to run thousands of clients.
        Same semantics as the default loop: seeded shuffle, FedProx term, the task's loss and
        accuracy."""
        x, y = (t.numpy() for t in data.tensors)  # type: ignore[attr-defined]
        generator = torch.Generator().manual_seed(config.seed)
        mu, lr = np.float32(config.proximal_mu), np.float32(config.lr)
        # Views: updating them in place updates the model.
        w, b = model.weight.detach().numpy(), model.bias.detach().numpy()  # type: ignore[union-attr]
        anchor_w, anchor_b = w.copy(), b.copy()
        loss_sum, correct = 0.0, 0
        for _epoch in range(config.local_epochs):
            loss_sum, correct = 0.0, 0
            order = torch.randperm(len(y), generator=generator).numpy()
            for start in range(0, len(y), config.batch_size):
                idx = order[start : start + config.batch_size]
                xb, yb, rows = x[idx], y[idx], np.arange(len(idx))
                z = xb @ w.T + b
                z -= z.max(1, keepdims=True)
                p = np.exp(z)
                total = p.sum(1, keepdims=True)
                loss_sum -= float((z[rows, yb] - np.log(total[:, 0])).sum())
                correct += int((z.argmax(1) == yb).sum())
                p /= total
                p[rows, yb] -= 1.0
                p /= len(idx)
                grad_w, grad_b = p.T @ xb, p.sum(0)
                if mu > 0:
                    grad_w += mu * (w - anchor_w)
                    grad_b += mu * (b - anchor_b)
                w -= lr * grad_w
                b -= lr * grad_b
        n = len(y)
        return TrainResult(n, {"train_loss": loss_sum / n, "train_accuracy": correct / n})

    def load_partition(self, partition: Partition) -> LocalData:
        x, y, xt, yt = device_data(self.alpha, self.beta, partition.index, self.data_seed, self.iid)
        test = TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt)) if len(yt) else None
        return LocalData(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), test)

    @functools.cache  # noqa: B019 - one task object per process; the set is read-only
    def _held_out(self) -> tuple[np.ndarray, ...]:
        return pooled_test(self.alpha, self.beta, TEST_DEVICES, self.data_seed, self.iid)

    def server_test_data(self) -> TensorDataset:
        x, y = self._held_out()
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


task = SyntheticTask(0.5, 0.5)
synthetic_0_0 = SyntheticTask(0.0, 0.0)
synthetic_05_05 = task
synthetic_1_1 = SyntheticTask(1.0, 1.0)
synthetic_iid = SyntheticTask(0.0, 0.0, iid=True)
synthetic_iid_05 = SyntheticTask(0.0, 0.5, iid=True)
