"""Where virtual clients run: the engine, Ray's address and each worker's resources (no Ray
import here, so the driver and the workers both read it without importing each other)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ENGINES = ("embedded", "ray")

# Batches per worker per round: enough to balance uneven clients across workers, few enough
# that the per-call cost (Ray: ~0.6 ms measured on 2 cores) stays small next to the work.
BATCHES_PER_WORKER = 4


@dataclass(frozen=True)
class RaySettings:
    """The workers of either engine (`workers`, `cpus`: torch threads of an embedded worker)
    and, for Ray, where and how it runs."""

    address: str | None = None  # None: start a local Ray instance
    cpus: float = 1.0  # per worker (= per concurrently running virtual client)
    gpus: float = 0.0
    workers: int | None = None  # None: as many as the resources allow; embedded 0: in-process
    object_store_mb: int = 128  # local Ray only
    temp_dir: str | None = None  # local Ray only (default: Ray's, /tmp/ray)


def parse_resources(text: str) -> tuple[float, float]:
    """`cpus=1,gpus=0` -> (1.0, 0.0); either key may be left out."""
    values = {"cpus": 1.0, "gpus": 0.0}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in values:
            raise ValueError(f"--client-resources: expected cpus=N,gpus=M, got {text!r}")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--client-resources: {key.strip()} must be a number") from None
    if values["cpus"] <= 0 or values["gpus"] < 0:
        raise ValueError("--client-resources: cpus must be > 0 and gpus >= 0")
    return values["cpus"], values["gpus"]


def batches(ids: Sequence[str], workers: int) -> list[list[str]]:
    """A round's clients cut into about BATCHES_PER_WORKER runs of consecutive ids per worker."""
    n = max(1, math.ceil(len(ids) / (max(1, workers) * BATCHES_PER_WORKER)))
    return [list(ids[i : i + n]) for i in range(0, len(ids), n)]
