"""fedgrpc's Bulyan and q-FedAvg reproduce Flower 1.41's own outputs to 1e-6 over 3 rounds.

The expected models come from Flower itself (tests/data/flower_parity.json, written by
`.venv-flower/bin/python -m bench.flower_parity`, which says how to make that venv): legacy and
Message-API strategies on the same seeded client models. Here each client's model becomes the
delta a fedclient would send (its model minus our current global, in float32) and goes through
the strategy as the coordinator hands it over: an UpdateSet with the client's metrics. Each
round starts from our own previous output, so errors would compound, not reset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.tensors import FlatModel, flatten_arrays, float_vector
from fedserver.strategies import AggregateInput, UpdateSet, build_strategy

FIXTURE = Path(__file__).resolve().parent / "data" / "flower_parity.json"
DATA = json.loads(FIXTURE.read_text())
TOLERANCE = 1e-6


def as_model(values: list[float]) -> FlatModel:
    arrays, pos = {}, 0
    for i, shape in enumerate(DATA["shapes"]):
        n = int(np.prod(shape))
        arrays[f"layer{i}"] = np.array(values[pos : pos + n], dtype=np.float32).reshape(shape)
        pos += n
    return flatten_arrays(arrays)


def round_input(x: FlatModel, rnd: int, record: dict[str, Any]) -> AggregateInput:
    deltas = np.array(record["clients"], dtype=np.float32) - float_vector(x)
    weights = np.array(record["num_examples"], dtype=np.float64)
    metrics = {"train_loss": np.array(record["train_loss"])}
    mean = (deltas * weights[:, None]).sum(axis=0) / weights.sum()
    updates = UpdateSet(deltas, weights, metrics)
    return AggregateInput(rnd, mean.astype(np.float32), float(weights.sum()), len(deltas), updates)


def replay(case: dict[str, Any]) -> list[np.ndarray]:
    """Our model after each round, from the case's initial model and client models."""
    strategy = build_strategy(case["strategy"], **case["params"])
    x, out = as_model(case["initial"]), []
    for rnd, record in enumerate(case["rounds"], 1):
        x = strategy.apply(x, round_input(x, rnd, record))
        out.append(float_vector(x).astype(np.float64))
    return out


@pytest.mark.parametrize("case", DATA["cases"], ids=[c["name"] for c in DATA["cases"]])
def test_three_rounds_match_flower(case: dict[str, Any]) -> None:
    ours = replay(case)
    assert len(ours) == len(case["rounds"]) == 3
    for rnd, (got, record) in enumerate(zip(ours, case["rounds"], strict=True), 1):
        want = np.array(record["expected"])
        worst = float(np.max(np.abs(got - want)))
        assert worst <= TOLERANCE, f"round {rnd}: max |fedgrpc - flower| = {worst:.3g}"


def test_the_fixture_discriminates() -> None:
    """The cases are not degenerate: Flower's two Bulyan selections and FedAvg all differ from
    each other on them, so matching one is not matching any robust-ish mean."""
    by_name = {c["name"]: c for c in DATA["cases"]}
    krum, multi = by_name["bulyan-legacy-f2"], dict(by_name["bulyan-legacy-f2"])
    multi["params"] = dict(multi["params"], bulyan_selection="multikrum")
    expected = [np.array(r["expected"]) for r in krum["rounds"]]
    assert any(np.max(np.abs(a - b)) > 1e-3 for a, b in zip(replay(multi), expected, strict=True))
    fedavg = dict(krum, strategy="fedavg", params={})
    assert all(np.max(np.abs(a - b)) > 1e-3 for a, b in zip(replay(fedavg), expected, strict=True))
