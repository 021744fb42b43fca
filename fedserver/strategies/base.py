"""What every aggregation strategy implements, and the helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fedcore.durable import owns_its_pages
from fedcore.tensors import FlatModel, Manifest, ManifestError

# Coordinate blocks robust strategies read at a time: O(clients x BLOCK) memory, never the whole
# (clients x model) matrix.
BLOCK_VALUES = 1 << 18


@dataclass(frozen=True)
class UpdateSet:
    """Every update of a round, for strategies that cannot work from the mean alone.

    `vectors` is (clients, values) float32, normally a read-only np.memmap over a spill file:
    read it in column blocks (see `blocks`) so memory stays O(clients x block).
    """

    vectors: np.ndarray
    weights: np.ndarray  # num_examples per row, as the clients reported them
    # Per row, the client metrics the strategy asked for (Strategy.update_metrics), by name.
    metrics: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.weights) != self.vectors.shape[0]:
            raise ValueError("UpdateSet needs a (clients, values) matrix and one weight per row")
        if any(len(v) != len(self.weights) for v in self.metrics.values()):
            raise ValueError("UpdateSet needs one value per row for each metric")

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    def blocks(self, block: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """(columns, float32 copy of vectors[:, columns]) over all coordinates."""
        block = block or BLOCK_VALUES
        d = self.vectors.shape[1]
        for start in range(0, d, block):
            cols = slice(start, min(d, start + block))
            yield cols, np.asarray(self.vectors[:, cols], dtype=np.float32)


@dataclass(frozen=True)
class AggregateInput:
    """One closed round's updates, already folded by the streaming accumulator.

    `updates` is filled only for strategies with `needs_all_updates` (median, Krum...).
    """

    round: int
    # Example-weighted mean of the clients' float32 delta vectors. The round's own: nothing
    # reads it after `apply`, which may consume it (FedAvg sums the model into it in place).
    mean_delta: np.ndarray
    total_weight: float
    num_updates: int
    updates: UpdateSet | None = None
    # Live clients the round's participants were drawn from (0: unknown); SCAFFOLD's N.
    population: int = 0


class Strategy(ABC):
    """Turns the global model and a round's aggregate into the next global model.

    Strategies are pure (numpy only). Anything they carry across rounds (server momentum,
    optimizer moments) is exposed through state_arrays/load_state_arrays so a resumed run
    continues exactly where it stopped. Constructor keyword arguments are the strategy's
    parameters (the CLI maps --server-lr to server_lr, and so on).
    """

    name: ClassVar[str]
    # True: the coordinator keeps every verified update on disk and passes AggregateInput.updates.
    needs_all_updates: ClassVar[bool] = False
    # Client metrics kept beside each spooled update (UpdateSet.metrics; needs_all_updates): an
    # update without them is refused (reason missing_metric), and round_config should ask the
    # clients for them.
    update_metrics: tuple[str, ...] = ()

    def check_update_metrics(self, metrics: Mapping[str, float]) -> str | None:
        """Why an update with these client metrics cannot be used (refused before its bytes
        are read, reason bad_metrics), or None."""
        missing = [m for m in self.update_metrics if m not in metrics]
        if missing:
            return (
                f"strategy {self.name} reads metric {', '.join(missing)} of every update, and "
                "this one has none: fedclient reports it when the round config asks for it; "
                "upgrade the client, or have a custom client report it"
            )
        return None

    def min_updates(self) -> tuple[int, str]:
        """The fewest updates a round may close with, and why: settings under which a round
        could close with fewer are refused at start-up (coordinator/assembly.py)."""
        return 1, ""

    # False: every update must carry every tensor (SCAFFOLD's Δc pairs with the whole Δy).
    partial_updates: ClassVar[bool] = True

    def round_config(self, round_number: int) -> dict[str, str]:
        """Extra knobs sent to clients with the round config (e.g. FedProx's mu)."""
        return {}

    def exchanged(self, floats: Manifest) -> Manifest:
        """The float tensors an update carries, for a model whose floats are `floats`; the
        mean handed to `apply` covers them in this order."""
        return floats

    def client_tensors(self, global_model: FlatModel) -> FlatModel | None:
        """Tensors each selected client is sent beside the model (SCAFFOLD's c); None: none."""
        return None

    @abstractmethod
    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel: ...

    def params(self) -> dict[str, float | str]:
        """The strategy's parameters, for logs and the run's metadata."""
        return {}

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(arrays)}")


def add_to_floats(model: FlatModel, delta: np.ndarray, consume: bool = False) -> FlatModel:
    """model + delta over the floating tensors (computed in float32, rounded to each dtype).

    Tensor by tensor, so the only temporaries are one tensor's worth (none for float32, which
    is added in place in the copy): aggregation must not hold extra model-sized vectors.
    With `consume` (the caller owns `delta` and drops it) a model of float32 tensors only is
    summed into `delta` itself, which becomes the new model's buffer: no copy of the model,
    so aggregating holds two models (old and new), not three (old, delta and new).
    """
    if consume and _is_float32_buffer(model, delta):
        np.add(delta, model.buffer.view(np.float32), out=delta)
        return FlatModel(model.manifest, delta.view(np.uint8))
    out = model.copy()
    pos = 0
    for t in model.manifest.floats().tensors:
        part = delta[pos : pos + t.numel].reshape(t.shape)
        if t.dtype == "float32":
            target = out.raw(t.name)
            np.add(target, part, out=target)
        else:
            out.assign_float32(t.name, out.as_float32(t.name) + part)
        pos += t.numel
    if pos != delta.size:
        raise ManifestError(f"delta has {delta.size} values, the model's floats {pos}")
    return out


def _is_float32_buffer(model: FlatModel, delta: np.ndarray) -> bool:
    """Whether `delta` (the float vector) has the exact layout of `model`'s buffer and may
    hold it: every tensor float32 (so the float vector is the buffer), a writable contiguous
    float32 array of its own (not a view of something else that lives on)."""
    return (
        all(t.dtype == "float32" for t in model.manifest.tensors)
        and delta.dtype == np.float32
        and delta.ndim == 1
        and delta.size * 4 == model.buffer.size
        and delta.flags.c_contiguous
        and delta.flags.writeable
        and (delta.base is None or owns_its_pages(delta))
    )


def require(condition: bool, message: str) -> None:
    """Parameter validation: a ValueError the CLI shows as a usage error."""
    if not condition:
        raise ValueError(message)


def load_named_state(
    strategy: str, arrays: dict[str, np.ndarray], names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Validate checkpointed state: either empty (before the first round) or exactly `names`."""
    if arrays and set(arrays) != set(names):
        raise ValueError(
            f"checkpointed state of strategy {strategy} has {sorted(arrays)}, "
            f"expected {sorted(names)}: was the run started with another --strategy?"
        )
    return {k: np.array(v, dtype=np.float32).reshape(-1) for k, v in arrays.items()}


def require_updates(agg: AggregateInput, strategy: str) -> UpdateSet:
    if agg.updates is None or agg.updates.count == 0:
        raise ValueError(f"strategy {strategy} needs every update but got none")
    return agg.updates


def coordinatewise(
    agg: AggregateInput, strategy: str, reduce: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply `reduce` ((clients, block) -> (block,)) over every coordinate block of the updates."""
    updates = require_updates(agg, strategy)
    out = np.empty(updates.vectors.shape[1], dtype=np.float32)
    for cols, block in updates.blocks():
        out[cols] = reduce(block)
    return out
