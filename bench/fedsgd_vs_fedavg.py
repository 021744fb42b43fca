"""FedSGD vs FedAvg on digits: rounds and bytes to reach a held-out accuracy (docs/modes.md).

An in-process simulation of the exact client and strategy code (Task.train / compute_gradient,
local_update.gradient_vector, FedAvg.apply) without gRPC, so it is deterministic and takes seconds:

    .venv/bin/python -m bench.fedsgd_vs_fedavg [--clients 3] [--target 0.95] [--out modes.json]

Bytes per round = clients x (model download + fp32 update), the same for both modes: FedSGD
trades local computation for many more rounds, so it needs many more bytes to a given accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from examples.digits import task
from fedclient.local_update import gradient_vector
from fedclient.partition import Partition
from fedclient.task import TrainConfig
from fedcore.tensors import flatten_state_dict, float_vector, to_state_dict
from fedserver.coordinator.central_eval import initial_model
from fedserver.strategies import AggregateInput, build_strategy


@dataclass
class Run:
    mode: str
    setting: str
    rounds_to_target: int | None
    final_accuracy: float
    bytes_per_round: int

    @property
    def bytes_to_target(self) -> int | None:
        return (
            None if self.rounds_to_target is None else self.rounds_to_target * self.bytes_per_round
        )


def simulate(mode: str, clients: int, rounds: int, target: float, server_lr: float) -> Run:
    model_flat = initial_model(task, 0)
    strategy = build_strategy("fedavg", server_lr=server_lr)
    parts = [task.load_partition(Partition(i, clients)).train for i in range(clients)]
    test = task.server_test_data()
    model = task.build_model()
    defaults = task.default_config()
    floats = model_flat.manifest.floats()
    update_bytes = 4 * sum(t.numel for t in floats.tensors)
    reached, accuracy = None, 0.0
    for r in range(1, rounds + 1):
        total, weight = np.zeros(update_bytes // 4, np.float32), 0.0
        for i, data in enumerate(parts):
            model.load_state_dict(to_state_dict(model_flat))
            config = TrainConfig(
                local_epochs=defaults.local_epochs,
                lr=defaults.lr,
                batch_size=defaults.batch_size,
                seed=1000 * r + i,
            )
            torch.manual_seed(config.seed)
            if mode == "fedsgd":
                result = task.compute_gradient(model, data, config)
                vec = -gradient_vector(model, floats)
            else:
                result = task.train(model, data, config)
                vec = float_vector(flatten_state_dict(model.state_dict())) - float_vector(
                    model_flat
                )
            total += np.float32(result.num_examples) * vec
            weight += result.num_examples
        model_flat = strategy.apply(
            model_flat, AggregateInput(r, total / np.float32(weight), weight, clients)
        )
        model.load_state_dict(to_state_dict(model_flat))
        accuracy = task.evaluate(model, test)["accuracy"]
        if reached is None and accuracy >= target:
            reached = r
            break
    setting = f"server_lr {server_lr:g}" if mode == "fedsgd" else f"{defaults.local_epochs} epochs"
    return Run(mode, setting, reached, accuracy, clients * (model_flat.buffer.size + update_bytes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--fedavg-rounds", type=int, default=50)
    parser.add_argument("--fedsgd-rounds", type=int, default=1000)
    parser.add_argument("--server-lr", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [simulate("fedavg", args.clients, args.fedavg_rounds, args.target, 1.0)]
    runs += [
        simulate("fedsgd", args.clients, args.fedsgd_rounds, args.target, lr)
        for lr in args.server_lr
    ]
    base = runs[0].bytes_to_target
    print(f"digits, {args.clients} IID clients, target held-out accuracy {args.target}")
    print(
        f"{'mode':8} {'setting':16} {'rounds':>7} {'MB to target':>13} {'x fedavg':>9} {'acc':>6}"
    )
    for run in runs:
        mb = run.bytes_to_target
        ratio = f"{mb / base:.1f}" if mb and base else "-"
        shown = f"{mb / 1e6:.2f}" if mb else "-"
        rounds = run.rounds_to_target or f">{args.fedsgd_rounds}"
        print(
            f"{run.mode:8} {run.setting:16} {rounds!s:>7} {shown:>13} {ratio:>9} "
            f"{run.final_accuracy:6.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                [run.__dict__ | {"bytes_to_target": run.bytes_to_target} for run in runs],
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
