"""The workload both Flower paths share: the model, the client's reply, the round clock, and the
Message API FedAvg that reads the clock (apps.py and simulation.py).

It mirrors bench/synthetic.py (P float32 values in tensors of at most 4 Mi values, the same
seeded normal * 0.01 initialisation) and bench/client.py (every client adds a fixed 1e-4 and
trains nothing), without importing fedgrpc: this module runs in Flower's own venv.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

TENSOR_VALUES = 4 << 20  # as bench/synthetic.py: 16 MiB per tensor at most
DELTA = np.float32(1e-4)  # as bench/client.py's default --value


def initial_arrays(num_params: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays, left = [], num_params
    while left:
        n = min(left, TENSOR_VALUES)
        arrays.append(rng.standard_normal(n, dtype=np.float32) * np.float32(0.01))
        left -= n
    return arrays


def updated(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """What a no-train client sends back: the model it got plus a fixed delta.

    Flower clients return weights, not deltas; adding the delta client-side keeps the
    coordinator's work (receive N models, average them) the same as ours (receive N deltas,
    average them, add).
    """
    return [np.add(a, DELTA, dtype=np.float32) for a in arrays]


class RoundClock:
    """Seconds per round: from the strategy configuring a round to it having aggregated.

    Each round's wall-clock span (time.time()) goes out too, so the harness can read the
    coordinator's CPU time over exactly these rounds from its /proc samples.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.spans: list[tuple[float, float]] = []
        self._started = (0.0, 0.0)

    def start(self) -> None:
        self._started = (time.perf_counter(), time.time())

    def stop(self) -> None:
        self.seconds.append(time.perf_counter() - self._started[0])
        self.spans.append((self._started[1], time.time()))

    def write(self, path: str, **extra: object) -> None:
        # Written last and renamed into place: the harness waits for this file to appear.
        out = Path(path)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"round_seconds": self.seconds, "spans": self.spans, **extra}))
        tmp.replace(out)


class TimedFedAvg(FedAvg):
    def __init__(self, clock: RoundClock, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clock = clock

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.clock.start()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        if result[0] is None:
            raise RuntimeError(f"round {server_round}: no valid replies")
        self.clock.stop()
        return result
