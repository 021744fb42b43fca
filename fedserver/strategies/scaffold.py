"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1). The coordinator keeps the server control variate c; each
selected client trains with corrected steps g - c_i + c and returns Δy_i (its model delta) and
Δc_i = c_i⁺ - c_i (fedclient/scaffold.py). With Δy, Δc the round's example-weighted means:

    x ← x + η_g · Δy            (η_g = --server-lr, default 1)
    c ← c + (|S| / N) · Δc      (|S| updates counted, N live clients the round drew from)

Δc travels as extra tensors of the update (fedcore/scaffold.py), so the mean handed to `apply`
is [Δy, Δc]; c is checkpointed with the strategy state and sent to clients by the offer.
"""

from __future__ import annotations

import numpy as np

from fedcore.scaffold import ROUND_KEY, control_model, exchanged
from fedcore.tensors import FlatModel, Manifest
from fedserver.strategies.base import (
    AggregateInput,
    Strategy,
    add_to_floats,
    load_named_state,
    require,
)


def control_step(
    control: np.ndarray, mean_delta_c: np.ndarray, counted: int, population: int
) -> np.ndarray:
    """c + (|S|/N)·Δc; N unknown (0) or below |S| counts as full participation."""
    share = 1.0 if population <= counted else counted / population
    return (control + np.float32(share) * mean_delta_c).astype(np.float32)


class Scaffold(Strategy):
    name = "scaffold"
    partial_updates = False

    def __init__(self, server_lr: float = 1.0) -> None:
        require(server_lr > 0, f"--server-lr must be > 0, got {server_lr}")
        self.server_lr = float(server_lr)
        self.control: np.ndarray | None = None  # c over the model's floats; None: still 0
        self._sent: FlatModel | None = None  # c as clients get it, rebuilt when c changes

    def round_config(self, round_number: int) -> dict[str, str]:
        return {ROUND_KEY: "1"}

    def exchanged(self, floats: Manifest) -> Manifest:
        return exchanged(floats)

    def client_tensors(self, global_model: FlatModel) -> FlatModel | None:
        floats = global_model.manifest.floats()
        sent = self._sent
        if sent is None or [t.shape for t in sent.manifest.tensors] != [
            t.shape for t in floats.tensors
        ]:
            values = self.control
            if values is None:
                values = np.zeros(sum(t.numel for t in floats.tensors), dtype=np.float32)
            sent = self._sent = control_model(floats, values)
        return sent

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        floats = global_model.manifest.floats()
        d = sum(t.numel for t in floats.tensors)
        require(
            agg.mean_delta.size == 2 * d,
            f"a SCAFFOLD mean holds Δy and Δc ({2 * d} values), got {agg.mean_delta.size}",
        )
        mean = agg.mean_delta.astype(np.float32, copy=False)
        control = self.control if self.control is not None else np.zeros(d, dtype=np.float32)
        new_control = control_step(control, mean[d:], agg.num_updates, agg.population)
        new_model = add_to_floats(global_model, np.float32(self.server_lr) * mean[:d])
        # Built here, in the aggregation thread, and swapped in whole: a poll on the event loop
        # sees the old c or the new one, never a half-written one.
        self._sent = control_model(floats, new_control)
        self.control = new_control
        return new_model

    def params(self) -> dict[str, float]:
        return {"server_lr": self.server_lr}

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.control is None else {"control": self.control.copy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.control = load_named_state(self.name, arrays, ("control",)).get("control")
        self._sent = None
