"""FedAdagrad (Reddi et al. 2021): v <- v + delta^2 (there is no beta2)."""

from __future__ import annotations

import numpy as np

from fedserver.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def __init__(self, server_lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, tau=tau)

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq

    def params(self) -> dict[str, float]:
        return {k: v for k, v in super().params().items() if k != "beta2"}
