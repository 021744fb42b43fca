"""The coordinator's state dir: safetensors checkpoints and an SQLite history.

    STATE/model.safetensors                    the current global model
    STATE/checkpoints/round-NNNN.safetensors   the global model after round NNNN (0 = initial)
    STATE/checkpoints/round-NNNN.strategy.safetensors   strategy state, when it has any
    STATE/state.db                             rounds, per-client receipts, clients, run metadata
    STATE/incoming/                            unlinked spill files of updates being received

With --encrypt-state every safetensors file above is sealed with AES-256-GCM (fedcore/sealed.py)
under a role naming the file ("model", "checkpoint:round-0003", "strategy:round-0003"), so a
file copied over another one is refused. state.db holds no tensors and stays plain SQLite
(history.py).

A round is committed when its row lands in SQLite; that happens only after its checkpoint is on
disk (atomic rename + fsync), so after kill -9 the last committed round always has an intact
checkpoint, and files of an uncommitted round are simply overwritten when it is redone.

Everything in the state dir is the owner's only, whatever the umask (docs/security.md): the dir
and its folders are 0700 (an existing dir open to others is tightened, with a warning), files
0600 (fedcore.files.atomic_write; state.db is created 0600 before SQLite opens it, and SQLite
gives its -wal and -shm files the database's mode).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedcore import faults
from fedcore.durable import DIRECT_MIN, PAGE, private_dir
from fedcore.files import (
    atomic_link,
    atomic_write,
    copy_safetensors,
    read_safetensors,
    safetensors_header,
    write_safetensors,
)
from fedcore.sealed import StateCipher
from fedcore.tensors import FlatModel, flatten_arrays
from fedserver.state.history import RoundHistory

log = logging.getLogger("fedserver")

MODEL_ROLE = "model"


def checkpoint_role(round_number: int) -> str:
    return f"checkpoint:round-{round_number:04d}"


def strategy_role(round_number: int) -> str:
    return f"strategy:round-{round_number:04d}"


class StateDirBusy(RuntimeError):
    """Another live coordinator holds this state dir."""


class StateStore(RoundHistory):
    """The state dir: its lock, checkpoints and published model, over the SQLite history."""

    def __init__(self, state_dir: Path, cipher: StateCipher | None = None) -> None:
        self.dir = Path(state_dir)
        self.cipher = cipher
        for folder in (self.dir, self.dir / "checkpoints", self.dir / "incoming"):
            private_dir(folder)  # incoming/: update spills (fedserver/updates/receiver.py)
        self._lock_file = self._take_lock()
        # Temp files of a write interrupted by kill -9: never read, so just remove them.
        for stale in [*self.dir.glob(".*.tmp"), *(self.dir / "checkpoints").glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
        # SQLite would create the file with the umask's mode (and copies it to -wal and -shm).
        os.close(os.open(self.dir / "state.db", os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.dir / "state.db", isolation_level=None, check_same_thread=False)
        # WAL: readers (fedserver status) never block the coordinator, and a commit is durable
        # once its WAL frame is fsynced (synchronous=FULL).
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        super().__init__(db)

    def _take_lock(self) -> int:
        """One coordinator per state dir; the kernel drops the lock when its holder dies."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirBusy(
                f"{self.dir} is in use by another coordinator (pid {holder}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def close(self) -> None:
        self.flush_clients()
        self.db.close()
        os.close(self._lock_file)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, round_number: int) -> Path:
        return self.dir / "checkpoints" / f"round-{round_number:04d}.safetensors"

    def strategy_path(self, round_number: int) -> Path:
        return self.dir / "checkpoints" / f"round-{round_number:04d}.strategy.safetensors"

    @property
    def model_path(self) -> Path:
        return self.dir / "model.safetensors"

    def write_checkpoint(
        self, round_number: int, model: FlatModel, strategy_state: dict[str, np.ndarray]
    ) -> None:
        meta = {"round": str(round_number), "model_version": model.version, "format": "fedgrpc"}
        big = model.buffer.nbytes >= DIRECT_MIN  # written once, never read back: skip the cache
        parts = _checkpoint_parts(model, meta, PAGE if big else 8)
        role = checkpoint_role(round_number)
        sealed = self.cipher.seal(parts, role) if self.cipher else parts
        atomic_write(self.checkpoint_path(round_number), sealed, direct=big)
        if strategy_state:
            write_safetensors(
                self.strategy_path(round_number),
                flatten_arrays(strategy_state),
                meta,
                self.cipher,
                strategy_role(round_number),
            )

    def publish_model(self, model: FlatModel, round_number: int) -> None:
        meta = {"round": str(round_number), "model_version": model.version, "format": "fedgrpc"}
        if self.cipher is None and self._checkpoint_holds(round_number, model):
            # Unsealed, the export is byte for byte the round's checkpoint: link, don't rewrite
            # (saves a model-sized write + fsync per round).
            with contextlib.suppress(OSError):
                atomic_link(self.checkpoint_path(round_number), self.model_path)
                return
        write_safetensors(self.model_path, model, meta, self.cipher, MODEL_ROLE)

    def _checkpoint_holds(self, round_number: int, model: FlatModel) -> bool:
        """Whether the checkpoint file of `round_number` is exactly `model` (read its header)."""
        try:
            with open(self.checkpoint_path(round_number), "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 1 << 24:
                    return False
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            return False
        return header.get("__metadata__", {}).get("model_version") == model.version

    def load_checkpoint(self, round_number: int) -> tuple[FlatModel, dict[str, np.ndarray]]:
        model, meta = read_safetensors(
            self.checkpoint_path(round_number), self.cipher, checkpoint_role(round_number)
        )
        if meta.get("model_version") not in (None, model.version):
            raise ValueError(
                f"checkpoint for round {round_number} does not match its recorded version"
            )
        strategy: dict[str, np.ndarray] = {}
        if self.strategy_path(round_number).exists():
            flat, _ = read_safetensors(
                self.strategy_path(round_number), self.cipher, strategy_role(round_number)
            )
            strategy = {t.name: flat.raw(t.name).copy() for t in flat.manifest.tensors}
        return model, strategy


def export_model(
    state_dir: Path, out: Path, cipher: StateCipher | None, round_number: int | None = None
) -> tuple[int, str]:
    """Write the current model (or a round's checkpoint) as plain safetensors; (round, version).

    Read-only on the state dir. Every byte is authenticated (and the version checked) before
    `out` appears, so a wrong key or a tampered file leaves `out` untouched.
    """
    state_dir = Path(state_dir)
    if round_number is None:
        path, role = state_dir / "model.safetensors", MODEL_ROLE
    else:
        path = state_dir / "checkpoints" / f"round-{round_number:04d}.safetensors"
        role = checkpoint_role(round_number)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    # Streamed, block by block: exporting a model larger than RAM works too.
    meta, version = copy_safetensors(path, Path(out), cipher, role)
    return int(meta.get("round", round_number or 0)), version


def _checkpoint_parts(
    model: FlatModel, meta: dict[str, str], align: int
) -> Iterator[bytes | memoryview]:
    """A checkpoint's bytes for atomic_write, the data at a multiple of `align` (a page: written
    with O_DIRECT from the model's own memory where it is page-aligned); the `checkpoint` fault
    freezes halfway through."""
    yield safetensors_header(model, meta, align)
    data = memoryview(model.buffer).cast("B")
    half = data.nbytes // 2 // PAGE * PAGE
    yield data[:half]
    faults.freeze("checkpoint", int(meta["round"]))
    yield data[half:]
