"""fedclient/model_memory.py: a model bound to one flat buffer, only where that is exact, and
the round's base kept on disk and subtracted back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedclient.model_memory import WINDOW, BoundModel, bind_model
from fedcore.device import Placement
from fedcore.tensors import flatten_state_dict, state_manifest


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


def test_binding_keeps_the_values_and_the_parameter_objects() -> None:
    model = _mlp()
    before = flatten_state_dict(model.state_dict()).buffer.tobytes()
    params = list(model.parameters())
    bound = BoundModel.bind(model, state_manifest(model.state_dict()))
    assert bound is not None and bound.holds()
    assert bound.buffer.tobytes() == before  # the buffer is the model's FlatModel buffer
    assert list(model.parameters()) == params  # optimizers built before still hold them
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training writes the buffer
    assert bound.buffer.view(np.float32)[0] == model[0].weight[0, 0].item()


def test_a_model_moved_or_replaced_is_no_longer_held() -> None:
    model = _mlp()
    bound = BoundModel.bind(model, state_manifest(model.state_dict()))
    assert bound is not None and bound.holds(bound.buffer)
    assert not bound.holds(bound.buffer.copy())  # another buffer
    model[2].bias.data = model[2].bias.data.clone()  # as `model.to("cuda")` does
    assert not bound.holds()


def test_models_it_cannot_hold_exactly_are_left_alone() -> None:
    bn = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))  # int64 counter
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    half = torch.nn.Linear(3, 3).to(torch.bfloat16)
    for model in (bn, tied, half):
        state = model.state_dict()
        ptrs = [t.data_ptr() for t in state.values()]
        assert BoundModel.bind(model, state_manifest(state)) is None
        assert [t.data_ptr() for t in model.state_dict().values()] == ptrs


def test_the_saved_base_is_subtracted_window_by_window(tmp_path: Path) -> None:
    model = torch.nn.Module()
    values = WINDOW // 4 + 1000  # more than a window, not a multiple of it
    model.register_parameter("w", torch.nn.Parameter(torch.randn(values)))
    bound = BoundModel.bind(model, state_manifest(model.state_dict()), tmp_path / "state")
    assert bound is not None
    base = bound.buffer.view(np.float32).copy()
    bound.save_base()
    with torch.no_grad():
        model.w.mul_(2.0).add_(0.5)  # "training"
    expected = bound.buffer.view(np.float32) - base
    vector = bound.buffer.view(np.float32)
    bound.subtract_base(vector)
    assert np.array_equal(vector, expected)
    assert list((tmp_path / "state").iterdir()) == []  # the file has no name to leave behind
    bound.close()


def test_a_folder_that_cannot_hold_the_base_is_said_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("not a folder")
    model = _mlp()
    bound = BoundModel.bind(model, state_manifest(model.state_dict()), tmp_path / "file")
    assert bound is not None
    with caplog.at_level("WARNING", logger="fedclient"):
        assert bound.save_base() is False
    assert "could not keep this round's base model on disk" in caplog.text
    assert str(tmp_path / "file") in caplog.text  # the path, to fix it


def test_only_a_cpu_client_without_personal_tensors_binds() -> None:
    cpu = SimpleNamespace(placement=Placement(torch.device("cpu")))
    gpu = SimpleNamespace(placement=Placement(torch.device("meta")))  # any device but the CPU
    manifest = state_manifest(_mlp().state_dict())
    assert bind_model(cpu, _mlp(), manifest, "", None) is not None
    assert bind_model(cpu, _mlp(), manifest, "2.bias", None) is None
    assert bind_model(gpu, _mlp(), manifest, "", None) is None
