"""Flower's own Bulyan and QFedAvg on fixed seeded inputs, 3 rounds each: the fixture that
tests/test_flower_parity.py checks fedgrpc's strategies against (to 1e-6).

Runs in Flower's venv only (it imports flwr, never fedgrpc; flwr 1.41 cannot share fedgrpc's
.venv, see bench/flower-constraints.txt). To regenerate the committed fixture:

    python3.11 -m venv .venv-flower
    .venv-flower/bin/pip install -c bench/flower-constraints.txt 'flwr==1.41.0' numpy
    .venv-flower/bin/python -m bench.flower_parity    # writes FIXTURE

Both of Flower 1.41's APIs are covered, since they differ:

- the legacy `flwr.server.strategy` classes, driven through `aggregate_fit`. Bulyan selects
  with repeated Krum (the paper's); QFedAvg takes one loss for every client from the server's
  `evaluate_fn` on the round's global model (here a fixed function of the model, recorded).
  QFedAvg's `pre_weights` is set as its `configure_fit` sets it (that call needs a client
  manager and nothing else of it).
- the Message API `flwr.serverapp.strategy` classes, driven through `aggregate_train`. Bulyan
  selects with Multi-Krum (scores computed once); QFedAvg reads each client's "train_loss".
  QFedAvg's `current_arrays` is set as its `configure_train` sets it (that call needs a Grid).

Each round, every client sends the global model plus a seeded delta (Bulyan: a few clients send
-10 x theirs), cast to float32 as a client's model is; the next round starts from Flower's
output. Floats are written with repr, so the JSON holds them exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "flower_parity.json"
SHAPES = [(4, 5), (7,)]  # two tensors, 27 values
ROUNDS = 3
Layers = list[np.ndarray]


def flat(layers: Layers) -> list[float]:
    return [float(v) for a in layers for v in np.asarray(a).reshape(-1)]


def unflat(values: np.ndarray) -> Layers:
    out, pos = [], 0
    for shape in SHAPES:
        n = int(np.prod(shape))
        out.append(values[pos : pos + n].reshape(shape))
        pos += n
    return out


def client_models(
    rng: np.random.Generator, x: Layers, n: int, attackers: tuple[int, ...], scale: float
) -> list[Layers]:
    """Every client's trained model (float32): x + a shared drift + its own noise; attackers
    send -10 x their delta."""
    drift = rng.normal(scale=scale, size=sum(a.size for a in x))
    models = []
    for i in range(n):
        delta = drift + rng.normal(scale=scale, size=drift.size)
        if i in attackers:
            delta = -10.0 * delta
        models.append(
            unflat((np.concatenate([a.reshape(-1) for a in x]) + delta).astype(np.float32))
        )
    return models


def server_loss(layers: Layers) -> float:
    """Legacy QFedAvg's evaluate_fn: any fixed function of the model will do."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in layers])
    return float(0.5 + np.mean(values * values))


def legacy(case: dict[str, Any], x: Layers, models: list[Layers], losses: list[float]) -> Layers:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Bulyan, QFedAvg
    from flwr.server.strategy.aggregate import aggregate_krum

    if case["kind"] == "bulyan":
        strategy: Any = Bulyan(
            num_malicious_clients=case["f"], first_aggregation_rule=aggregate_krum, to_keep=0
        )
    else:
        strategy = QFedAvg(
            q_param=case["q"],
            qffl_learning_rate=case["lr"],
            evaluate_fn=lambda rnd, params, config: (server_loss(params), {}),
        )
        strategy.pre_weights = parameters_to_ndarrays(ndarrays_to_parameters(x))
    results = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(m), n, {}))
        for m, n in zip(models, case["num_examples"], strict=True)
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    return parameters_to_ndarrays(params)


def message_api(
    case: dict[str, Any], x: Layers, models: list[Layers], losses: list[float]
) -> Layers:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import Bulyan, QFedAvg
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1  # replies are built as a ServerApp's would be, outside one
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 0
    if case["kind"] == "bulyan":
        strategy: Any = Bulyan(num_malicious_nodes=case["f"])
    else:
        strategy = QFedAvg(client_learning_rate=case["lr"], q=case["q"])
        strategy.current_arrays = ArrayRecord([np.asarray(a) for a in x])
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train"
    )
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord([np.array(a) for a in m]),
                    "metrics": MetricRecord({"num-examples": n, "train_loss": loss}),
                }
            ),
            reply_to=instruction,
        )
        for m, n, loss in zip(models, case["num_examples"], losses, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_numpy_ndarrays()


CASES: list[dict[str, Any]] = [
    # Bulyan: n = 4f + 3 (f = 2, odd theta) and n = 8 (f = 1, even theta: the median averages).
    {"name": "bulyan-legacy-f2", "api": "legacy", "kind": "bulyan", "f": 2, "clients": 11,
     "attackers": (1, 6), "fedgrpc": {"bulyan_byzantine": 2, "bulyan_selection": "krum"}},
    {"name": "bulyan-legacy-f1", "api": "legacy", "kind": "bulyan", "f": 1, "clients": 8,
     "attackers": (3,), "fedgrpc": {"bulyan_byzantine": 1, "bulyan_selection": "krum"}},
    {"name": "bulyan-message-f2", "api": "message", "kind": "bulyan", "f": 2, "clients": 11,
     "attackers": (1, 6), "fedgrpc": {"bulyan_byzantine": 2, "bulyan_selection": "multikrum"}},
    {"name": "bulyan-message-f1", "api": "message", "kind": "bulyan", "f": 1, "clients": 8,
     "attackers": (3,), "fedgrpc": {"bulyan_byzantine": 1, "bulyan_selection": "multikrum"}},
    # q-FedAvg: legacy (one server loss per round, recorded) and Message API (per client).
    {"name": "qfedavg-legacy", "api": "legacy", "kind": "qfedavg", "q": 0.5, "lr": 0.1,
     "clients": 5, "attackers": (),
     "fedgrpc": {"q_param": 0.5, "qffl_learning_rate": 0.1, "qffl_loss_metric": "train_loss"}},
    {"name": "qfedavg-message", "api": "message", "kind": "qfedavg", "q": 2.0, "lr": 0.05,
     "clients": 6, "attackers": (),
     "fedgrpc": {"q_param": 2.0, "qffl_learning_rate": 0.05, "qffl_loss_metric": "train_loss"}},
]  # fmt: skip


def run_case(case: dict[str, Any], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = unflat(rng.normal(size=sum(int(np.prod(s)) for s in SHAPES)).astype(np.float32))
    out: dict[str, Any] = {
        "name": case["name"],
        "strategy": case["kind"],
        "params": case["fedgrpc"],
        "initial": flat(x),
        "rounds": [],
    }
    case = dict(case, num_examples=[int(v) for v in rng.integers(10, 200, size=case["clients"])])
    aggregate = legacy if case["api"] == "legacy" else message_api
    for _ in range(ROUNDS):
        scale = 0.1 if case["kind"] == "bulyan" else 0.3
        models = client_models(rng, x, case["clients"], case["attackers"], scale)
        if case["api"] == "legacy" and case["kind"] == "qfedavg":
            losses = [server_loss(x)] * case["clients"]
        else:
            losses = [float(v) for v in rng.uniform(0.2, 3.0, size=case["clients"])]
        x = aggregate(case, x, models, losses)
        out["rounds"].append(
            {
                "clients": [flat(m) for m in models],
                "num_examples": case["num_examples"],
                "train_loss": losses,
                "expected": flat(x),
            }
        )
    return out


def main() -> None:
    import flwr

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    head = {
        "generated_by": f"python -m bench.flower_parity (flwr {flwr.__version__}, "
        f"numpy {np.__version__})",
        "shapes": [list(s) for s in SHAPES],
    }
    cases = [json.dumps(run_case(case, seed)) for seed, case in enumerate(CASES)]
    # One line per case: a regenerated fixture diffs case by case.
    text = json.dumps(head)[:-1] + ', "cases": [\n' + ",\n".join(cases) + "\n]}\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}: {len(CASES)} cases x {ROUNDS} rounds")


if __name__ == "__main__":
    main()
