"""Coordinator-side use of the user's Task: the initial model and held-out evaluation."""

from __future__ import annotations

from typing import Any

from fedcore.tensors import FlatModel, to_state_dict


def initial_model(task: Any, seed: int) -> FlatModel:
    """The round-0 global model (Task.initial_model: the task's model built under `seed`).

    Asking the task for a FlatModel, rather than a torch module, lets a torch-free task keep
    torch out of the coordinator process entirely (its import alone is a few hundred MB).
    """
    return task.initial_model(seed)


class Evaluator:
    """Scores a global model on the task's held-out set (the coordinator's own data)."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.data = task.server_test_data()
        self.model = task.build_model() if self.data is not None else None

    @property
    def enabled(self) -> bool:
        return self.data is not None

    def __call__(self, flat: FlatModel) -> dict[str, float]:
        if self.model is None:
            return {}
        self.model.load_state_dict(to_state_dict(flat))
        return {k: float(v) for k, v in self.task.evaluate(self.model, self.data).items()}
