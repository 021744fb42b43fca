"""FedAdam (Reddi et al. 2021): v <- beta2 * v + (1 - beta2) * delta^2."""

from __future__ import annotations

import numpy as np

from fedserver.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return np.float32(self.beta2) * v + np.float32(1 - self.beta2) * delta_sq
