"""A client of one model's memory: the model's tensors live in one flat buffer, the one each
global model downloads into and each update leaves from, and the model a round trains from is
kept on disk meanwhile, for the update (trained - base) once training is done.

Without this, a client holds two models: the torch model it trains and the downloaded global it
must subtract afterwards (a 2.4 GB model: 4.8 GB, more than half of an 8 GB device). With it,
one, plus the base in the page cache, which the kernel may write back and drop under pressure.

Only for what it can do exactly: a CPU model whose state_dict is float32 tensors, each the
storage of a parameter or buffer of its own (no tied weights, no extra state), on a client
that trains on the CPU. A model moved elsewhere after binding (a task's own `model.to(...)`) is
noticed (`BoundModel.holds`) and the client goes the two-model way: load each global into the
model, keep the base in memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.durable import page_aligned_zeros
from fedcore.tensors import Manifest

WINDOW = 16 << 20  # bytes of the base read back at a time to subtract it
log = logging.getLogger("fedclient")


def bind_model(
    task: Any, model: Any, manifest: Manifest, personal: str, folder: Path | None
) -> BoundModel | None:
    """The session's model as one buffer, where it can be (see BoundModel.bind); None else.
    Not with FedPer's `personal` tensors, which are loaded over the global's and so need a base
    apart from it, nor on a GPU, where the model trains apart from the host's buffer."""
    placement = getattr(task, "placement", None)
    if personal or (placement is not None and placement.device.type != "cpu"):
        return None
    bound = BoundModel.bind(model, manifest, folder)
    if bound is not None:
        log.info(
            "the model's %d MB are the buffer each global model downloads into; the base of "
            "a round is kept on disk while it trains",
            bound.buffer.nbytes // 10**6,
        )
    return bound


@dataclass(frozen=True)
class _Slot:
    owner: Any  # the module whose parameter or buffer it is
    attr: str
    is_parameter: bool
    offset: int  # bytes into the flat buffer
    shape: tuple[int, ...]


class BoundModel:
    """`model`'s state_dict tensors rebound as views of `buffer`, in manifest order (so the
    buffer is a FlatModel's buffer for that manifest, and its float32 vector is the model)."""

    def __init__(
        self, model: Any, buffer: np.ndarray, slots: list[_Slot], folder: Path | None
    ) -> None:
        self.model = model
        self.buffer = buffer
        self._slots = slots
        self._folder = folder
        self._base: _BaseFile | None = None

    @classmethod
    def bind(cls, model: Any, manifest: Manifest, folder: Path | None = None) -> BoundModel | None:
        """Move `model`'s tensors into one buffer, one tensor at a time (never two models in
        memory), or None, leaving it untouched, when it is not a model this can hold exactly.
        `folder`: where the base is kept during training (None: the system's temporary one)."""
        slots = _slots(model, manifest)
        if slots is None:
            return None
        import torch

        buffer = page_aligned_zeros(manifest.total_bytes, np.uint8)
        values = buffer.view(np.float32)
        for slot in slots:
            current = getattr(slot.owner, slot.attr)
            n = current.numel()
            view = torch.from_numpy(values[slot.offset // 4 : slot.offset // 4 + n])
            view = view.view(slot.shape)
            with torch.no_grad():
                view.copy_(current)
            if slot.is_parameter:
                current.data = view  # the same Parameter object: optimizers and hooks keep it
            else:
                slot.owner._buffers[slot.attr] = view
            del current
        return cls(model, buffer, slots, folder)

    def holds(self, buffer: np.ndarray | None = None) -> bool:
        """Whether the model's tensors are still views of our buffer (a task may have moved or
        replaced them), and `buffer`, if given, is that buffer."""
        if buffer is not None and buffer is not self.buffer:
            return False
        base = self.buffer.ctypes.data
        for slot in self._slots:
            tensor = getattr(slot.owner, slot.attr, None)
            if (
                tensor is None
                or tensor.device.type != "cpu"
                or tensor.data_ptr() != base + slot.offset
                or tuple(tensor.shape) != slot.shape
            ):
                return False
        return True

    def save_base(self) -> bool:
        """Keep the buffer's bytes (the model a round trains from) on disk; False, with a
        warning, when the disk refuses (full, read-only): the caller keeps them in memory."""
        try:
            if self._base is None:
                self._base = _BaseFile(self._folder)
            self._base.save(self.buffer)
        except OSError as e:
            log.warning(
                "could not keep this round's base model on disk (%s); keeping it in memory "
                "(one model more) this round",
                e,
            )
            return False
        return True

    def subtract_base(self, vector: np.ndarray) -> None:
        """vector -= the saved base, as float32 (`vector`: the buffer's float32 view, trained)."""
        if self._base is None:
            raise RuntimeError("subtract_base before save_base")
        self._base.subtract_from(vector)

    def close(self) -> None:
        if self._base is not None:
            self._base.close()
            self._base = None


def _slots(model: Any, manifest: Manifest) -> list[_Slot] | None:
    """Where each of the manifest's tensors lives in `model`, if every one is a float32,
    contiguous CPU parameter or buffer of its own, in state_dict order; else None."""
    state = model.state_dict()
    if list(state) != [t.name for t in manifest.tensors]:
        return None
    if any(t.dtype != "float32" for t in manifest.tensors) or not manifest.total_bytes:
        return None
    slots, seen = [], set()
    for spec in manifest.tensors:
        off, _ = manifest.offsets[spec.name]
        module_name, _, attr = spec.name.rpartition(".")
        try:
            owner = model.get_submodule(module_name)
        except AttributeError:
            return None
        is_parameter = attr in owner._parameters
        if not is_parameter and attr not in owner._buffers:
            return None  # extra state, or a state_dict hook's own entry
        tensor = getattr(owner, attr)
        exported = state[spec.name]
        if (
            tensor is None
            or tensor.device.type != "cpu"
            or not tensor.is_contiguous()
            or tensor.data_ptr() != exported.data_ptr()
            or tensor.data_ptr() in seen  # tied weights: one tensor under two names
            or tensor.numel() == 0
        ):
            return None
        seen.add(tensor.data_ptr())
        slots.append(_Slot(owner, attr, is_parameter, off, tuple(spec.shape)))
    return slots


class _BaseFile:
    """The model a round trains from, on disk while the model's own memory trains: written
    before training, read back a window at a time and subtracted after it. One file for the
    client's life, overwritten in place each round (its pages stay cached: no fresh pages for
    the kernel to find each round), deleted when closed or when the process ends."""

    def __init__(self, folder: Path | None = None) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        # Unlinked at once (TemporaryFile): nothing to clean up after a crash or kill -9;
        # closed by close().
        self._file = tempfile.TemporaryFile(prefix="fedclient-base-", dir=folder)  # noqa: SIM115
        self._scratch: np.ndarray | None = None

    def save(self, buffer: np.ndarray) -> None:
        """Keep `buffer`'s bytes (OSError, e.g. a full disk, for the caller to fall back on)."""
        fd, view = self._file.fileno(), memoryview(buffer).cast("B")
        offset = 0
        while offset < len(view):  # pwrite may write less than asked
            offset += os.pwrite(fd, view[offset : offset + WINDOW], offset)

    def subtract_from(self, vector: np.ndarray) -> None:
        """vector -= the saved bytes as float32 (vector: the float32 view of what was saved,
        now trained), a window at a time."""
        if self._scratch is None:
            self._scratch = np.empty(WINDOW // 4, np.float32)
        fd, step = self._file.fileno(), WINDOW // 4
        for start in range(0, vector.size, step):
            part = vector[start : start + step]
            scratch = self._scratch[: part.size]
            _read_exactly(fd, memoryview(scratch).cast("B"), start * 4)
            np.subtract(part, scratch, out=part)

    def close(self) -> None:
        self._file.close()
        self._scratch = None


def _read_exactly(fd: int, into: memoryview, offset: int) -> None:
    while into:
        n = os.preadv(fd, [into], offset)
        if n == 0:
            raise OSError(f"the saved base model ends early at byte {offset}")
        into, offset = into[n:], offset + n
