"""Coordinator-side use of the user's Task: the initial model and held-out evaluation.

`fedserver run --device` says where the held-out evaluation runs. The Task's default loops
(and tasks that override them) read `task.placement`, the same hook `fedclient run --device`
sets (fedcore/device.py), so the coordinator places the model and batches exactly as a client
does.
"""

from __future__ import annotations

from typing import Any

from fedcore.device import Placement
from fedcore.tensors import FlatModel, to_state_dict


def initial_model(task: Any, seed: int) -> FlatModel:
    """The round-0 global model (Task.initial_model: the task's model built under `seed`).

    Asking the task for a FlatModel, rather than a torch module, lets a torch-free task keep
    torch out of the coordinator process entirely (its import alone is a few hundred MB).
    """
    return task.initial_model(seed)


def placement_for(device: str) -> Placement | None:
    """`--device` resolved (ValueError says why a device is unavailable); None for `cpu`, where
    every task evaluates already: resolving it would import torch into a torch-free task's
    coordinator for nothing."""
    if device.strip().lower() == "cpu":
        return None
    return Placement.parse(device)


class Evaluator:
    """Scores a global model on the task's held-out set (the coordinator's own data)."""

    def __init__(self, task: Any, placement: Placement | None = None) -> None:
        self.task = task
        if placement is not None:
            # Evaluation is fp32 whatever the clients train at: the coordinator's score is the
            # reference every round is compared against.
            task.placement = placement
        self.data = task.server_test_data()
        self.model = task.build_model() if self.data is not None else None

    @property
    def enabled(self) -> bool:
        return self.data is not None

    def __call__(self, flat: FlatModel) -> dict[str, float]:
        if self.model is None:
            return {}
        # A model already moved to the device takes the CPU tensors in place (copied over).
        self.model.load_state_dict(to_state_dict(flat))
        return {k: float(v) for k, v in self.task.evaluate(self.model, self.data).items()}
