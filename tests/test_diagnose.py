"""fedclient/diagnose.py: which findings explain which failure (unit level; the CLI output of
`fedclient check` and `fedclient run` is asserted in tests/test_task_check.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fedclient.diagnose import TaskMistake, diagnose, explained
from fedclient.partition import Partition
from fedclient.task import LocalData
from tests.newcomer_task import Blobs, float64

WHOLE = Partition.parse("0/1")


def test_labels_beyond_the_model_outputs_are_explained() -> None:
    task = Blobs()
    y = torch.tensor([0, 1, 2, 7])
    data = LocalData(TensorDataset(torch.zeros(4, 4), y))
    model = task.build_model()
    with pytest.raises(TaskMistake) as info, explained("training failed", task, data, model):
        torch.nn.functional.cross_entropy(model(torch.zeros(4, 4)), y)
    assert "class labels go up to 7 but the model outputs 3 classes: give the last layer 8 " in (
        str(info.value)
    )
    assert str(info.value).startswith("training failed: IndexError: Target 7 is out of bounds.")


def test_int32_labels_are_explained() -> None:
    task = Blobs()
    y = torch.tensor([0, 1, 2], dtype=torch.int32)
    data = LocalData(TensorDataset(torch.zeros(3, 4), y))
    model = task.build_model()
    fix = r"fix: targets are int32: multiclass \(CrossEntropyLoss"
    with pytest.raises(TaskMistake, match=fix), explained("training failed", task, data, model):
        torch.nn.functional.cross_entropy(model(torch.zeros(3, 4)), y)


def test_a_finding_that_does_not_explain_the_error_is_left_out() -> None:
    """float64 features with a model that casts them itself: a bug elsewhere stays as it is."""
    data = float64.load_partition(WHOLE)
    model = float64.build_model()
    assert diagnose(float64, data, model)[0].startswith("features are float64")
    with pytest.raises(KeyError), explained("training failed", float64, data, model):
        raise KeyError("a bug in the task's own code")
