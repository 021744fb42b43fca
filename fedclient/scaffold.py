"""SCAFFOLD on the client (Karimireddy et al., ICML 2020, Algorithm 1, lines 8-12): corrected
local steps and this client's control variate c_i, kept across rounds.

Every optimizer step of the round uses the corrected gradient g - c_i + c. The correction is
added by a global optimizer step pre-hook while the local update runs, so it works with any
Task's training loop and optimizer that steps a torch optimizer (under a GradScaler the hook
runs after unscaling). The hook also sums the raw gradients g it sees, and

    c_i⁺ = (1/K) Σ_k g_k            (K optimizer steps this round)

which is the paper's option II, c_i - c + (x - y_i)/(K·η_l), computed from the gradients
rather than from the displacement: the two are equal for plain SGD (tests/test_scaffold.py
checks it), and the gradient form stays the mean gradient under momentum or Adam, where
(x - y_i)/(K·η_l) overstates it by up to 1/(1 - momentum). Δc_i = c_i⁺ - c_i travels beside
Δy_i (fedcore/scaffold.py); c_i⁺ replaces c_i once the coordinator counted the update.

c_i lives in this process and in STATE_DIR/scaffold-control.safetensors (fedclient run
--state-dir), tagged with the federation and the client id, so a restarted client resumes it;
a file of another federation, client or model shape is not used (c_i starts at 0). A virtual
client of the simulation keeps the same file, one per client in the simulation's StateStore
(fedclient/state.py), through this same class; its c_i⁺ is written PENDING beside it and takes
c_i's place (`settle`) once the driver saw the coordinator count the update.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedclient.retry import PermanentError
from fedcore.durable import fsync_dir, private_dir
from fedcore.files import read_safetensors, write_safetensors
from fedcore.scaffold import control_manifest, control_model, is_scaffold_round
from fedcore.tensors import FlatModel, Manifest, ManifestError, float_vector

log = logging.getLogger("fedclient")
STATE_FILE = "scaffold-control.safetensors"
PENDING = ".pending"  # + a c_i file's name: c_i⁺ until its update is counted (simulation)


class ControlVariate:
    """This client's c_i: in memory across rounds, on disk when it has a state dir."""

    def __init__(
        self,
        state_dir: Path | None,
        client_id: str,
        file: str = STATE_FILE,
        announce: bool = True,
    ) -> None:
        """`file`: its name in `state_dir` (the simulation's StateStore names one per client);
        `announce`: log a resumed c_i (a virtual client resumes it every round: no log)."""
        self.state_dir = state_dir
        self.client_id = client_id
        self.file = file
        self.announce = announce
        self._held: tuple[str, str, Manifest, np.ndarray] | None = None

    @property
    def path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / self.file

    def for_round(
        self,
        extra: Mapping[str, str],
        round_number: int,
        sent: tuple[int, FlatModel] | None,
        base: FlatModel,
        federation_id: str,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(c, c_i) for a round whose config is `extra`, or None when it is not SCAFFOLD's;
        `sent`: the (round, c) the coordinator's header carried."""
        if not is_scaffold_round(extra):
            return None
        if self.state_dir is None:
            raise PermanentError(
                "the coordinator runs --strategy scaffold: this client must keep its control "
                "variate across rounds and restarts; pass --state-dir DIR (and a fixed "
                "--client-id, so a restarted client is the same client)"
            )
        floats = base.manifest.floats()
        if sent is None or sent[0] != round_number or sent[1].manifest != control_manifest(floats):
            raise PermanentError(
                "the coordinator announced a SCAFFOLD round without its control variate c "
                "for this model (ModelHeader.strategy_manifest)"
            )
        return float_vector(sent[1]), self.current(federation_id, floats)

    def current(self, federation_id: str, floats: Manifest) -> np.ndarray:
        """c_i for this federation, client and model; zeros when none was kept."""
        client_id = self.client_id
        manifest = control_manifest(floats)
        if self._held is not None and self._held[:3] == (federation_id, client_id, manifest):
            return self._held[3].copy()
        values = self._read(federation_id, client_id, manifest)
        if values is None:
            values = np.zeros(manifest.total_bytes // 4, dtype=np.float32)
        self._held = (federation_id, client_id, manifest, values)
        return values.copy()

    def _read(self, federation_id: str, client_id: str, manifest: Manifest) -> np.ndarray | None:
        path = self.path
        if path is None or not path.exists():
            return None
        try:
            flat, meta = read_safetensors(path)
        except (ManifestError, OSError) as e:
            log.warning("SCAFFOLD: cannot read %s (%s); c_i starts at 0", path, e)
            return None
        mine = (meta.get("federation_id"), meta.get("client_id")) == (federation_id, client_id)
        if not mine or flat.manifest != manifest:
            log.info("SCAFFOLD: %s belongs to another run or client; c_i starts at 0", path)
            return None
        if self.announce:
            log.info("SCAFFOLD: resumed this client's control variate from %s", path)
        return float_vector(flat)

    def commit(
        self, federation_id: str, floats: Manifest, values: np.ndarray, pending: bool = False
    ) -> Path | None:
        """c_i ← c_i⁺, atomically on disk (fsync, rename) before it is used again. `pending`:
        c_i⁺ is written beside c_i, to replace it only when `settle` says its update counted
        (the simulation's driver, which submits the update, learns that; this worker does not).
        Returns the file written (None without a state dir)."""
        client_id = self.client_id
        flat = control_model(floats, values)
        path = self.path
        if path is not None:
            private_dir(path.parent)  # c_i is derived from this client's data: 0700
            meta = {"federation_id": federation_id, "client_id": client_id}
            if pending:
                path = path.with_name(path.name + PENDING)
            write_safetensors(path, flat, meta)
        if not pending:
            self._held = (federation_id, client_id, flat.manifest, float_vector(flat))
        return path


def settle(pending: Path, counted: bool) -> None:
    """A pending c_i⁺ (ControlVariate.commit(pending=True)) replaces c_i when its update was
    counted, as a `fedclient` process commits c_i⁺ once SubmitUpdate succeeded; else it is
    dropped and c_i stays."""
    if counted:
        os.replace(pending, pending.with_name(pending.name.removesuffix(PENDING)))
        fsync_dir(pending.parent)
    else:
        pending.unlink(missing_ok=True)


class GradientMean:
    """What the step hook saw: K steps and the sum of raw gradients per float tensor."""

    def __init__(self, floats: Manifest) -> None:
        self.floats = floats
        self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}

    def mean(self) -> np.ndarray:
        """(1/K) Σ_k g_k over the model's floats in manifest order (0 where no gradient)."""
        if self.steps == 0:
            raise ValueError("SCAFFOLD: local training took no optimizer step")
        out = np.zeros(sum(t.numel for t in self.floats.tensors), dtype=np.float32)
        pos = 0
        for t in self.floats.tensors:
            total = self.sums.get(t.name)
            if total is not None:
                out[pos : pos + t.numel] = (total / self.steps).reshape(-1).cpu().numpy()
            pos += t.numel
        return out


@contextlib.contextmanager
def corrected_steps(model: Any, floats: Manifest, correction: np.ndarray) -> Iterator[GradientMean]:
    """While the block runs, every optimizer step adds `correction` (c - c_i, float32 over the
    floats) to the gradients of `model`'s parameters, after recording the raw gradients."""
    seen = GradientMean(floats)
    parts: dict[str, np.ndarray] = {}
    pos = 0
    for t in floats.tensors:
        parts[t.name] = correction[pos : pos + t.numel].reshape(t.shape)
        pos += t.numel
    placed: dict[str, torch.Tensor] = {}  # the correction on each parameter's device and dtype

    def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        seen.steps += 1
        for name, param in model.named_parameters():
            grad = param.grad
            if grad is None or name not in parts:
                continue
            raw = grad.detach().float()
            seen.sums[name] = seen.sums[name] + raw if name in seen.sums else raw.clone()
            fix = placed.get(name)
            if fix is None or fix.device != grad.device or fix.dtype != grad.dtype:
                fix = placed[name] = torch.from_numpy(parts[name]).to(grad.device, grad.dtype)
            grad.add_(fix)

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        yield seen
    finally:
        handle.remove()
