"""FedYogi (Reddi et al. 2021): v <- v - (1 - beta2) * delta^2 * sign(v - delta^2).

Unlike Adam, v grows or shrinks additively, so a burst of large deltas does not wipe the
memory of earlier small ones (Zaheer et al. 2018).
"""

from __future__ import annotations

import numpy as np

from fedserver.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - np.float32(1 - self.beta2) * delta_sq * np.sign(v - delta_sq)
