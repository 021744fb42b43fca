"""Where and at what precision a Task's loops run: `--device` and `--precision`, resolved.

Shared by `fedclient run --device/--precision` (training and evaluation on a client) and
`fedserver run --device` (the coordinator's held-out evaluation, fedserver/coordinator/
central_eval.py), hence in fedcore: fedserver may not import fedclient. torch is imported only
when a device is resolved, never by importing this module.

`auto` picks CUDA when this torch sees a CUDA device, else Apple's MPS, else the CPU. Whatever
the device, the update leaves the client as CPU-side float32 (fedclient/local_update.py): a
device only changes where the arithmetic happens, never what goes on the wire.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """`auto|cpu|cuda|cuda:N|mps` -> a torch.device this machine has; ValueError says why not."""
    import torch

    text = name.strip().lower()
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if text == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind == "cuda" and (not index or index.isdigit()):
        if not cuda:
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
            raise ValueError(
                f"--device {name}: CUDA is not available on this machine (torch "
                f"{torch.__version__} built for {built}): use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return torch.device(text)
    if kind == "mps" and not index:
        if not mps:
            raise ValueError(
                f"--device {name}: Apple MPS is not available on this machine: use --device "
                "cpu or auto"
            )
        return torch.device("mps")
    raise ValueError(f"--device must be one of {DEVICES_HELP}, got {name!r}")


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision; what a Task's loops run under."""

    device: torch.device
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}")

    @classmethod
    def parse(cls, device: str = "cpu", precision: str = "fp32") -> Placement:
        return cls(resolve_device(device), precision)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for a forward pass (and its loss); a no-op at fp32."""
        import torch

        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its gradients underflow without it); disabled otherwise."""
        import torch

        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches only help host-to-CUDA copies; elsewhere they cost memory."""
        return self.device.type == "cuda"

    def batch(self, inputs: Any, dtype: torch.dtype | None = None) -> Any:
        """A batch (tensor, or tuple/list/dict of them) on this device; floating tensors are
        cast to `dtype` when given (a bfloat16-native model takes bfloat16 inputs)."""
        import torch

        if isinstance(inputs, torch.Tensor):
            cast = dtype if dtype is not None and inputs.is_floating_point() else None
            return inputs.to(self.device, dtype=cast, non_blocking=self.pin_memory)
        if isinstance(inputs, tuple | list):
            return type(inputs)(self.batch(x, dtype) for x in inputs)
        if isinstance(inputs, dict):
            return {k: self.batch(v, dtype) for k, v in inputs.items()}
        return inputs


def configure(task: Any, device: str, precision: str) -> Placement:
    """Resolve the flags and hand them to `task` (its `placement`, read by the default loops
    and by tasks that override them); ValueError, for exit status 2, when they cannot hold."""
    placement = Placement.parse(device, precision)
    task.placement = placement
    return placement
