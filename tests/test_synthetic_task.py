"""examples/synthetic.py trains with softmax cross-entropy's gradient written out in numpy: it
must take the same steps as torch's autograd on the same loss (FedProx term included)."""

from __future__ import annotations

import pytest
import torch

from examples.synthetic import task
from fedclient.partition import Partition
from fedclient.task import TrainConfig


def _autograd_sgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, c: TrainConfig) -> None:
    """The reference: minibatch SGD with autograd, the same seeded shuffle."""
    generator = torch.Generator().manual_seed(c.seed)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params]
    for _ in range(c.local_epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), c.batch_size):
            idx = order[start : start + c.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            grads = torch.autograd.grad(loss + c.proximal_mu / 2 * drift, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(c.lr * g)


@pytest.mark.parametrize("mu", ["0", "0.5"])
def test_written_out_gradient_takes_autograds_steps(mu: str) -> None:
    data = task.load_partition(Partition(7, 1000, "iid", 0.5, 0))
    x, y = data.train.tensors  # type: ignore[attr-defined]
    config = TrainConfig(local_epochs=2, lr=0.05, batch_size=10, seed=5, extra={"proximal_mu": mu})
    torch.manual_seed(0)
    start = task.build_model()
    torch.nn.init.normal_(start.weight, std=0.3)  # type: ignore[arg-type]
    ours, reference = task.build_model(), task.build_model()
    ours.load_state_dict(start.state_dict())
    reference.load_state_dict(start.state_dict())
    result = task.train(ours, data.train, config)
    _autograd_sgd(reference, x, y, config)
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)
    assert not torch.equal(ours.weight, start.weight)  # type: ignore[arg-type]
    assert result.num_examples == len(y)
    assert 0.0 <= result.metrics["train_accuracy"] <= 1.0 and result.metrics["train_loss"] > 0
