"""Accuracy of every strategy on non-IID digits: an in-process simulation of the federation.

Each round every simulated client trains the global model with the task's own training loop
(fedclient.task.Task.train, the config a real coordinator would send, FedProx's mu included),
and the real strategy objects from fedserver.strategies aggregate the float32 deltas. Only the
transport is skipped, so a sweep of 9 strategies x 20 rounds takes a minute, not an hour.

    python -m bench.strategies --rounds 20 --clients 10 --partitioner dirichlet --alpha 0.3
    python -m bench.strategies --byzantine 2      # 2 clients send -10 x their delta

Prints a table and writes JSON (--out). Accuracy is on the coordinator's held-out 20% split.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedclient.partition import SCHEMES, Partition
from fedclient.task import Task, TrainConfig
from fedcore.plugins import load_object
from fedcore.tensors import FlatModel, flatten_state_dict, float_vector, to_state_dict
from fedserver.strategies import STRATEGIES, AggregateInput, UpdateSet, build_strategy

ATTACK_SCALE = -10.0


@dataclass(frozen=True)
class Setup:
    task: str = "examples.digits:task"
    rounds: int = 20
    clients: int = 10
    partitioner: str = "dirichlet"
    alpha: float = 0.3
    byzantine: int = 0
    seed: int = 0


def simulate(setup: Setup, strategy_name: str, params: dict[str, float]) -> list[float]:
    """Held-out accuracy after each round."""
    task: Task = load_object(setup.task)
    torch.manual_seed(setup.seed)
    model = task.build_model()
    global_model = flatten_state_dict(model.state_dict())
    datas = [
        task.load_partition(
            Partition(i, setup.clients, setup.partitioner, setup.alpha, setup.seed)
        ).train
        for i in range(setup.clients)
    ]
    base_cfg = task.default_config()
    strategy = build_strategy(strategy_name, **params)
    test = task.server_test_data()
    history = []
    for rnd in range(1, setup.rounds + 1):
        config = TrainConfig(
            base_cfg.local_epochs,
            base_cfg.lr,
            base_cfg.batch_size,
            extra=strategy.round_config(rnd),
        )
        base = float_vector(global_model)
        deltas, weights = [], []
        for i, data in enumerate(datas):
            cfg = TrainConfig(
                config.local_epochs,
                config.lr,
                config.batch_size,
                seed=setup.seed * 100_003 + rnd * 1009 + i,
                extra=config.extra,
            )
            torch.manual_seed(cfg.seed)
            model.load_state_dict(to_state_dict(global_model))
            result = task.train(model, data, cfg)
            delta = float_vector(flatten_state_dict(model.state_dict())) - base
            if i < setup.byzantine:
                delta = np.float32(ATTACK_SCALE) * delta
            deltas.append(delta)
            weights.append(float(result.num_examples))
        vectors = np.stack(deltas)
        w = np.array(weights)
        mean = (vectors * (w / w.sum())[:, None].astype(np.float32)).sum(axis=0)
        agg = AggregateInput(rnd, mean.astype(np.float32), float(w.sum()), len(deltas))
        if strategy.needs_all_updates:
            agg = AggregateInput(
                rnd, agg.mean_delta, agg.total_weight, agg.num_updates, UpdateSet(vectors, w)
            )
        global_model = strategy.apply(global_model, agg)
        history.append(_accuracy(task, model, global_model, test))
    return history


def _accuracy(task: Task, model: torch.nn.Module, flat: FlatModel, test: object) -> float:
    model.load_state_dict(to_state_dict(flat))
    metrics = task.evaluate(model, test)  # type: ignore[arg-type]
    return float(metrics["accuracy"]) if np.isfinite(metrics["loss"]) else 0.0


# Per-strategy parameters used by the sweep (the defaults unless noted in docs/algorithms.md).
# SCAFFOLD's clients train differently (corrected steps, c_i): bench/scaffold.py races it.
SWEEP: dict[str, dict[str, float]] = {name: {} for name in STRATEGIES if name != "scaffold"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=Setup.task)
    parser.add_argument("--rounds", type=int, default=Setup.rounds)
    parser.add_argument("--clients", type=int, default=Setup.clients)
    parser.add_argument("--partitioner", default=Setup.partitioner, choices=SCHEMES)
    parser.add_argument("--alpha", type=float, default=Setup.alpha)
    parser.add_argument("--byzantine", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default=",".join(SWEEP))
    parser.add_argument("--param", action="append", default=[], help="NAME.KEY=VALUE override")
    parser.add_argument("--out", type=Path, default=Path("bench-strategies.json"))
    args = parser.parse_args()
    setup = Setup(
        args.task,
        args.rounds,
        args.clients,
        args.partitioner,
        args.alpha,
        args.byzantine,
        args.seed,
    )
    sweep = {name: dict(SWEEP.get(name, {})) for name in args.strategies.split(",")}
    for item in args.param:
        key, value = item.split("=", 1)
        name, param = key.split(".", 1)
        sweep[name][param] = float(value) if "." in value or "e" in value else int(value)
    torch.set_num_threads(1)
    rows = []
    print(f"{setup}")
    print(
        f"{'strategy':<14} {'params':<40} {'acc@5':>6} {'acc@10':>6} {'final':>6} "
        f"{'best':>6} {'sec':>5}"
    )
    for name, params in sweep.items():
        started = time.monotonic()
        hist = simulate(setup, name, params)
        took = time.monotonic() - started
        shown = ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        print(
            f"{name:<14} {shown:<40} {hist[min(4, len(hist) - 1)]:6.3f} "
            f"{hist[min(9, len(hist) - 1)]:6.3f} {hist[-1]:6.3f} {max(hist):6.3f} {took:5.1f}",
            flush=True,
        )
        rows.append({"strategy": name, "params": params, "accuracy": hist, "seconds": took})
    args.out.write_text(json.dumps({"setup": setup.__dict__, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
