"""q-FedAvg (Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning",
ICLR 2020, Algorithm 2), as Flower's `QFedAvg`.

Client k trained from x to x + D_k and reports its loss F_k as a metric (--qffl-loss-metric).
With L = 1 / lr (the Lipschitz constant's estimate, lr = --qffl-learning-rate) and
g_k = L(x - x_k) = -D_k / lr, the step on the q-fair objective sum_k F_k^(q+1) / (q + 1):

    h_k = q F_k^(q-1) |g_k|^2 + L F_k^q
    x  <- x - sum_k F_k^q g_k / sum_k h_k

Clients with a higher loss weigh more as q grows; q = 0 is the unweighted mean of the D_k.
F_k + 1e-10 stands for F_k (Flower's guard against 0^(q-1)). The coefficients are float64; each
update is read once more in column blocks for its norm, so memory stays O(model).

Which loss: the paper's F_k is the loss of x on client k's data before it trains
(LOSS_BEFORE_TRAINING, the default: the round config asks fedclient to evaluate it, one extra
pass over its training data). Flower's Message-API QFedAvg reads each client's "train_loss"
metric instead (--qffl-loss-metric train_loss: fedclient's mean loss over its last local epoch,
no extra pass); Flower's legacy QFedAvg uses one server-side loss of x for every client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedcore.tensors import FlatModel
from fedserver.strategies.base import (
    AggregateInput,
    Strategy,
    add_to_floats,
    require,
    require_updates,
)

# The metric, and the round-config key asking fedclient for it (fedclient/local_update.py).
LOSS_BEFORE_TRAINING = "loss_before_training"
LOSS_GUARD = 1e-10


class QFedAvg(Strategy):
    name = "qfedavg"
    needs_all_updates = True

    def __init__(
        self,
        q_param: float = 0.2,
        qffl_learning_rate: float = 0.1,
        qffl_loss_metric: str = LOSS_BEFORE_TRAINING,
    ) -> None:
        require(q_param >= 0, f"--q-param must be >= 0, got {q_param}")
        require(
            qffl_learning_rate > 0,
            f"--qffl-learning-rate must be > 0, got {qffl_learning_rate}",
        )
        require(bool(qffl_loss_metric), "--qffl-loss-metric must name a client metric")
        self.q = float(q_param)
        self.lr = float(qffl_learning_rate)
        self.loss_metric = str(qffl_loss_metric)
        self.update_metrics = (self.loss_metric,)

    def params(self) -> dict[str, float | str]:
        return {
            "q_param": self.q,
            "qffl_learning_rate": self.lr,
            "qffl_loss_metric": self.loss_metric,
        }

    def round_config(self, round_number: int) -> dict[str, str]:
        return {LOSS_BEFORE_TRAINING: "1"} if self.loss_metric == LOSS_BEFORE_TRAINING else {}

    def check_update_metrics(self, metrics: Mapping[str, float]) -> str | None:
        if problem := super().check_update_metrics(metrics):
            return problem
        if metrics[self.loss_metric] < 0:
            # F_k^q of a negative loss is not a real number: the paper's losses are >= 0.
            return (
                f"strategy qfedavg needs {self.loss_metric} >= 0, got {metrics[self.loss_metric]}"
            )
        return None

    def coefficients(self, agg: AggregateInput) -> np.ndarray:
        """c_k (float64) such that x_next = x + sum_k c_k D_k."""
        updates = require_updates(agg, self.name)
        losses = np.asarray(updates.metrics.get(self.loss_metric, []), dtype=np.float64)
        if losses.shape != (updates.count,):
            raise ValueError(f"strategy {self.name} needs {self.loss_metric} of every update")
        sq_norms = np.zeros(updates.count, dtype=np.float64)
        for _, block in updates.blocks():
            b = block.astype(np.float64)
            sq_norms += (b * b).sum(axis=1)
        log_loss = np.log(losses + LOSS_GUARD)
        grad_sq = sq_norms / (self.lr * self.lr)  # |g_k|^2 = |D_k|^2 / lr^2
        # x - sum F_k^q (-D_k / lr) / sum h, with h_k = q F_k^(q-1) |g_k|^2 + F_k^q / lr: so
        # c_k = (F_k^q / lr) / sum h. In logs, scaled by the largest term: a client's loss is
        # its own word, and F^q of a finite loss overflows (1e300 at q = 2), which made the
        # step inf / inf = NaN and the published model NaN.
        steps = self.q * log_loss - math.log(self.lr)  # log(F_k^q / lr)
        with np.errstate(divide="ignore"):  # log 0 = -inf: a term of 0 (q = 0, D_k = 0)
            curvature = math.log(self.q) if self.q > 0 else -np.inf
            grads = curvature + (self.q - 1) * log_loss + np.log(grad_sq)
        top = max(steps.max(), grads.max())
        return np.exp(steps - top) / (np.exp(grads - top).sum() + np.exp(steps - top).sum())

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        updates = require_updates(agg, self.name)
        c = self.coefficients(agg)
        delta = np.empty(updates.vectors.shape[1], dtype=np.float32)
        for cols, block in updates.blocks():
            delta[cols] = c @ block.astype(np.float64)
        return add_to_floats(global_model, delta)
