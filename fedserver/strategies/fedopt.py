"""Adaptive server optimizers (Reddi et al., ICLR 2021, "Adaptive Federated Optimization").

The example-weighted mean client delta is a pseudo-gradient (pointing downhill). Each round:

    m <- beta1 * m + (1 - beta1) * delta
    v <- second_moment(v, delta)            (the only difference between the variants)
    x <- x + eta * m / (sqrt(v) + tau)

m starts at 0 and v at tau^2 (Algorithm 2: v_{-1} >= tau^2); no bias correction, as in the
paper. fedadam.py, fedyogi.py and fedadagrad.py each supply `second_moment`.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from fedcore.tensors import FlatModel
from fedserver.strategies.base import (
    AggregateInput,
    Strategy,
    add_to_floats,
    load_named_state,
    require,
)


class FedOpt(Strategy):
    """Shared moment bookkeeping; subclasses define how v accumulates delta^2."""

    def __init__(
        self,
        server_lr: float = 0.03,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        require(server_lr > 0, f"--server-lr must be > 0, got {server_lr}")
        require(0 <= beta1 < 1, f"--beta1 must be in [0, 1), got {beta1}")
        require(0 <= beta2 < 1, f"--beta2 must be in [0, 1), got {beta2}")
        require(tau > 0, f"--tau must be > 0, got {tau}")
        self.server_lr = float(server_lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray: ...

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        delta = agg.mean_delta.astype(np.float32)
        f32 = np.float32
        if self.m is None or self.v is None:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, f32(self.tau) ** 2)
        self.m = f32(self.beta1) * self.m + f32(1 - self.beta1) * delta
        self.v = self.second_moment(self.v, delta * delta)
        step = f32(self.server_lr) * self.m / (np.sqrt(self.v) + f32(self.tau))
        return add_to_floats(global_model, step)

    def params(self) -> dict[str, float]:
        return {
            "server_lr": self.server_lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }

    def state_arrays(self) -> dict[str, np.ndarray]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m.copy(), "v": self.v.copy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        state = load_named_state(self.name, arrays, ("m", "v"))
        self.m, self.v = state.get("m"), state.get("v")
