"""Common Task mistakes, explained with their fix: one diagnosis for `fedclient check` and for
a `fedclient run` whose training or evaluation fails.

Without it, float64 features, a TensorDataset instead of LocalData or float targets under the
multiclass objective each surfaced as a raw torch traceback at round 1 (`mat1 and mat2 must have
the same dtype`, `'TensorDataset' object has no attribute 'train'`, `expected target dtype to be
Long`). The data is looked at only once something failed (or in `check`), so a task that handles
such data itself (a forward() that casts, its own train loop) is never second-guessed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch

from fedclient.metrics import OBJECTIVES
from fedclient.partition import Partition
from fedclient.task import LocalData, Task
from fedcore.tensors import Manifest, state_manifest


class TaskMistake(Exception):
    """The task failed and we know why: `problems` say what to change."""

    def __init__(self, what: str, error: BaseException | None, problems: list[str]) -> None:
        self.problems = problems
        lines = [f"{what}: {_one_line(error)}" if error is not None else what]
        lines += [f"  fix: {p}" for p in problems]
        super().__init__("\n".join(lines))


def load(task: Task, partition: Partition) -> tuple[LocalData, Any, Manifest]:
    """The partition's data, a fresh model and its manifest (whose fingerprint a client sends
    at Join); a load_partition result of the wrong type is refused here, before any round."""
    data = task.load_partition(partition)
    if problem := _not_local_data(data):
        raise TaskMistake("load_partition returned the wrong type", None, [problem])
    model = task.build_model()
    return data, model, state_manifest(model.state_dict())


def diagnose(task: Task, data: Any, model: Any, error: BaseException | None = None) -> list[str]:
    """What is wrong with this task, its data and model, each with the fix; [] if we cannot
    tell. With `error` (training or evaluation raised it), findings that explain it."""
    if problem := _not_local_data(data):
        return [problem]
    objective = getattr(task, "objective", "multiclass")
    if objective not in OBJECTIVES:
        return [f"objective = {objective!r}: set one of {', '.join(OBJECTIVES)}"]
    problems = []
    for name, dataset in (("training", data.train), ("test", data.test)):
        if dataset is None:
            continue
        try:
            size = len(dataset)
        except TypeError:
            continue  # an iterable dataset: nothing to look at without consuming it
        if size == 0:
            if name == "training":
                problems.append(
                    "the training set is empty: check load_partition's slicing (fewer examples "
                    "than partitions?)"
                )
            continue
        problems += _example_problems(name, dataset[0], objective, _model_dtype(model))
    if error is not None:
        problems = _relevant(problems, str(error)) + _label_range(task, data.train, model, error)
    return list(dict.fromkeys(problems))  # one line each, in order


# What an error says when a finding is its cause (torch's wording). A finding whose symptom the
# error does not show is left out: a forward() that casts float64 itself fails for other reasons.
_SYMPTOMS = {
    "features are": r"dtype|Double|Half|BFloat16|scalar type",
    "targets are": r"target|Long|scalar type",
}


def _relevant(problems: list[str], error: str) -> list[str]:
    def explains(problem: str) -> bool:
        for prefix, pattern in _SYMPTOMS.items():
            if problem.startswith(prefix):
                return re.search(pattern, error) is not None
        return True

    return [p for p in problems if explains(p)]


@contextlib.contextmanager
def explained(what: str, task: Task, data: Any, model: Any) -> Iterator[None]:
    """Re-raise a failure of the task's own code as a TaskMistake when we know its cause."""
    try:
        yield
    except Exception as e:
        problems = diagnose(task, data, model, e)
        if problems:
            raise TaskMistake(what, e, problems) from e
        raise


def _not_local_data(data: Any) -> str | None:
    if isinstance(data, LocalData):
        return None
    return (
        f"load_partition returned {type(data).__name__}; return "
        f"fedclient.task.LocalData(train=..., test=...)"
    )


def _model_dtype(model: Any) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _example_problems(
    split: str, example: Any, objective: str, model_dtype: torch.dtype | None
) -> list[str]:
    if not isinstance(example, tuple | list) or len(example) != 2:
        return [
            f"a {split} example is {type(example).__name__}, not an (inputs, target) pair: the "
            f"default train and evaluate loops unpack `for inputs, targets in loader` "
            f"(torch.utils.data.TensorDataset(x, y) gives pairs)"
        ]
    inputs, target = (_tensor(v) for v in example)
    problems = []
    if (
        inputs is not None
        and inputs.is_floating_point()
        and model_dtype is not None
        and inputs.dtype != model_dtype
    ):
        dtype, wanted = _dtype_name(inputs.dtype), _dtype_name(model_dtype)
        problems.append(
            f"features are {dtype} but the model is {wanted}: convert with .float() / "
            f"torch.{wanted} in load_partition"
        )
    if target is not None and objective == "multiclass" and target.ndim == 0:
        if target.is_floating_point():
            problems.append(
                "targets are float but objective is 'multiclass': set objective = "
                '"regression" or return integer class labels (.long())'
            )
        elif target.dtype not in (torch.int64, torch.uint8):
            problems.append(
                f"targets are {_dtype_name(target.dtype)}: multiclass (CrossEntropyLoss) needs "
                f"int64 class labels: convert with .long() in load_partition"
            )
    return problems


def _label_range(task: Task, dataset: Any, model: Any, error: BaseException) -> list[str]:
    """Multiclass labels beyond the model's outputs: `Target 10 is out of bounds`."""
    if task.objective != "multiclass" or not re.search(
        r"out of bounds|index .* out of", str(error)
    ):
        return []
    with contextlib.suppress(Exception):
        inputs, targets = next(iter(torch.utils.data.DataLoader(dataset, batch_size=256)))
        with torch.no_grad():
            outputs = model(inputs)
        classes, top = outputs.shape[-1], int(targets.max())
        if top >= classes:
            return [
                f"class labels go up to {top} but the model outputs {classes} classes: give "
                f"the last layer {top + 1} outputs, or number the labels 0..{classes - 1}"
            ]
    return []


def _tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    with contextlib.suppress(Exception):
        return torch.as_tensor(value)  # numpy arrays and numbers, as DataLoader collates them
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
