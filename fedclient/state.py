"""What a client keeps between rounds, and the simulation's store of it on disk.

A `fedclient` process keeps its state in memory for as long as it runs (session.py: FedPer
personal tensors as it last trained them, top-k's error-feedback residual). A virtual client
has no process of its own, so the simulation keeps the same state in a `StateStore`: one
safetensors file per client id, read before the client trains and written after it encoded
its update, through the same pipeline (update.py `prepare_update`). A client that is not
training costs no memory, and a client that keeps nothing (no personal tensors, a codec
without error feedback) has no file. SCAFFOLD's control variate c_i has a file of its own per
client, `<client id>.scaffold-control.safetensors`, read and written by the same
ControlVariate (scaffold.py) that keeps a `fedclient` process's in its --state-dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedclient.scaffold import STATE_FILE, ControlVariate
from fedcore.codecs import ErrorFeedback

PERSONAL = "personal/"
RESIDUAL = "feedback/residual"


@dataclass
class ClientState:
    """One client's memory across rounds."""

    personal: dict[str, Any] = field(default_factory=dict)  # FedPer: name -> torch tensor
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    control: ControlVariate | None = None  # SCAFFOLD's c_i, kept in its own file

    @property
    def empty(self) -> bool:
        return not self.personal and self.feedback.residual is None


class StateStore:
    """Client states on disk under `root`, one `<client id>.safetensors` each."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, client_id: str) -> Path:
        if not client_id or "/" in client_id or client_id.startswith("."):
            raise ValueError(f"client id {client_id!r} cannot name a state file")
        return self.root / f"{client_id}.safetensors"

    def load(self, client_id: str) -> ClientState:
        path = self._path(client_id)  # checks the id, which names c_i's file too
        control = ControlVariate(self.root, client_id, f"{client_id}.{STATE_FILE}", announce=False)
        state = ClientState(control=control)
        if not path.exists():
            return state
        from safetensors.torch import load_file

        for name, tensor in load_file(str(path)).items():
            if name == RESIDUAL:
                state.feedback.residual = tensor.numpy()
            elif name.startswith(PERSONAL):
                state.personal[name.removeprefix(PERSONAL)] = tensor
        return state

    def save(self, client_id: str, state: ClientState) -> None:
        """Atomically: a client killed mid-write keeps its previous state, not half of one."""
        path = self._path(client_id)
        if state.empty:
            path.unlink(missing_ok=True)
            return
        import torch
        from safetensors.torch import save_file

        tensors = {PERSONAL + n: t.detach().contiguous() for n, t in state.personal.items()}
        residual = state.feedback.residual
        if residual is not None:
            tensors[RESIDUAL] = torch.from_numpy(np.ascontiguousarray(residual, dtype=np.float32))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
