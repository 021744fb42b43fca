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
