"""fedclient/state.py: a client's state between rounds, and the simulation's store of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedclient.state import ClientState, StateStore


def test_state_round_trips_through_its_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "clients")
    state = ClientState({"2.bias": torch.arange(3, dtype=torch.float32)})
    state.feedback.residual = np.array([0.5, -1.25], dtype=np.float32)
    store.save("client-7", state)
    assert [p.name for p in (tmp_path / "clients").iterdir()] == ["client-7.safetensors"]
    back = store.load("client-7")
    assert back.personal.keys() == {"2.bias"}
    assert torch.equal(back.personal["2.bias"], state.personal["2.bias"])
    assert back.feedback.residual is not None
    assert back.feedback.residual.tobytes() == state.feedback.residual.tobytes()


def test_a_client_that_keeps_nothing_has_no_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load("client-0").empty  # never ran
    store.save("client-0", ClientState())
    assert list(tmp_path.iterdir()) == []
    kept = ClientState()
    kept.feedback.residual = np.zeros(2, dtype=np.float32)
    store.save("client-0", kept)
    store.save("client-0", ClientState())  # its state emptied: the file goes
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "a/b"])
def test_client_ids_that_cannot_name_a_file_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="cannot name a state file"):
        StateStore(tmp_path).load(bad)


def test_c_i_plus_replaces_c_i_only_once_its_update_counted(tmp_path: Path) -> None:
    """A virtual client's c_i is fedclient's ControlVariate file, one per client in the store;
    its c_i⁺ waits beside it until the driver learns whether the update was counted, as a
    `fedclient` process commits c_i⁺ only after SubmitUpdate succeeded."""
    from fedclient.scaffold import settle
    from fedcore.tensors import Manifest, TensorSpec

    floats = Manifest((TensorSpec("w", "float32", (2,)),))
    store = StateStore(tmp_path)
    control = store.load("client-3").control
    assert control is not None
    assert not control.current("fed", floats).any()  # none kept yet: c_i = 0
    control.commit("fed", floats, np.array([1.0, 2.0], dtype=np.float32))
    for counted, expected in ((False, [1.0, 2.0]), (True, [3.0, 4.0])):
        values = np.array([3.0, 4.0], dtype=np.float32)
        pending = store.load("client-3").control.commit("fed", floats, values, pending=True)  # type: ignore[union-attr]
        assert pending is not None and pending.name.endswith(".pending")
        settle(pending, counted)
        again = store.load("client-3").control
        assert again is not None and again.current("fed", floats).tolist() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["client-3.scaffold-control.safetensors"]
