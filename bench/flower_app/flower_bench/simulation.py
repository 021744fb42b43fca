"""Flower 1.41's simulation engine on bench/simulation.py's grid; runs in .venv-flower only.

    python -m flower_bench.simulation --task synthetic --clients 1000 --rounds 3 \
        --ray-dir /tmp/rayf --out cell.json

`flwr.simulation.run_simulation` with N virtual SuperNodes on a local Ray of 2 CPUs (one per
ClientApp actor, as fedgrpc's `--workers 2 --client-resources cpus=1`), Message API FedAvg
training 10% of the nodes per round, no evaluation. Two ClientApps, the same work as fedgrpc's:

- noop: returns the model it got (one example), trains nothing;
- synthetic: Synthetic(0.5, 0.5) device `partition-id` from examples/synthetic_data.py (numpy,
  imported by path: the repo root is on PYTHONPATH), multinomial logistic regression 60 -> 10
  from zeros, minibatch SGD lr 0.01, batch 10, 2 local epochs, as examples/synthetic.py's
  default config; in numpy, Flower's natural form for it (fedgrpc's runs the task's torch loop).

Writes each round's seconds (RoundClock) to --out. Memory is sampled by the harness.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from examples.synthetic_data import DIMENSION, NUM_CLASSES, device_data
from flower_bench.common import RoundClock, TimedFedAvg

LR, BATCH, EPOCHS = 0.01, 10, 2


def sgd(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    """Minibatch SGD on softmax cross-entropy, in place."""
    rng = np.random.default_rng(seed)
    for _ in range(EPOCHS):
        order = rng.permutation(len(y))
        for start in range(0, len(y), BATCH):
            i = order[start : start + BATCH]
            z = x[i] @ w.T + b
            z -= z.max(1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(i)), y[i]] -= 1
            p /= len(i)
            w -= np.float32(LR) * (p.T @ x[i])
            b -= np.float32(LR) * p.sum(0)


def make_apps(task: str, clients: int, rounds: int, out: str) -> tuple[ServerApp, ClientApp]:
    server, client = ServerApp(), ClientApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        clock = RoundClock()
        per_round = clients // 10
        strategy = TimedFedAvg(
            clock,
            fraction_train=0.1,
            fraction_evaluate=0.0,
            min_train_nodes=per_round,
            min_available_nodes=clients,
        )
        zeros = [
            np.zeros((NUM_CLASSES, DIMENSION), np.float32),
            np.zeros(NUM_CLASSES, np.float32),
        ]
        strategy.start(grid=grid, initial_arrays=ArrayRecord(zeros), num_rounds=rounds)
        clock.write(out, clients=clients, task=task)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        w, b = msg.content["arrays"].to_numpy_ndarrays()
        n = 1
        if task == "synthetic":
            device = int(context.node_config["partition-id"])
            x, y, _, _ = device_data(0.5, 0.5, device)
            w, b = w.copy(), b.copy()
            sgd(w, b, x, y, seed=device)
            n = len(y)
        content = RecordDict(
            {"arrays": ArrayRecord([w, b]), "metrics": MetricRecord({"num-examples": n})}
        )
        return Message(content=content, reply_to=msg)

    return server, client


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=["noop", "synthetic"], required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ray-dir", required=True)
    p.add_argument("--object-store-mb", type=int, default=128)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    server, client = make_apps(a.task, a.clients, a.rounds, a.out)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=a.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": 2,
                "object_store_memory": a.object_store_mb << 20,
                "_temp_dir": a.ray_dir,
            },
        },
    )


if __name__ == "__main__":
    main()
