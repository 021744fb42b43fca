"""FedProx (Li et al., MLSys 2020): FedAvg aggregation; clients add (mu/2)||w - w_global||^2.

The proximal term lives in the client's training loop (fedclient.task.Task.train reads
config.extra["proximal_mu"]); the server side only announces mu each round.
"""

from __future__ import annotations

from fedserver.strategies.base import require
from fedserver.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.01, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        require(proximal_mu >= 0, f"--proximal-mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = float(proximal_mu)

    def round_config(self, round_number: int) -> dict[str, str]:
        return {"proximal_mu": repr(self.proximal_mu)}

    def params(self) -> dict[str, float]:
        return {"proximal_mu": self.proximal_mu} | super().params()
