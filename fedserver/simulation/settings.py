"""Where virtual clients run: Ray's address and each worker's resources (no Ray import here,
so the driver and the workers both read it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local Ray instance
    cpus: float = 1.0  # per worker (= per concurrently running virtual client)
    gpus: float = 0.0
    workers: int | None = None  # None: as many as the cluster's resources allow
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
