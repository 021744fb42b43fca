"""SCAFFOLD vs FedAvg on strongly non-IID digits: rounds to a held-out accuracy.

An in-process simulation of the exact client and strategy code: each client runs
fedclient.update's pipeline (`round_tensors`, `train`: the task's own training loop, with
SCAFFOLD's corrected steps and c_i from fedclient/scaffold.py), and the real strategy objects
(fedserver.strategies: fedavg, scaffold) apply the example-weighted mean, as the accumulator
would fold it. Only the transport is skipped (written when `fedserver simulate` refused
SCAFFOLD; it now runs it, docs/simulation.md). Both strategies see the same partitions, the
same per-(client, round) training seeds, the task's local epochs / lr / batch size, and every
client each round.

    python -m bench.scaffold --clients 10 --partitioner dirichlet --alpha 0.1 --seeds 0,1,2
    python -m bench.scaffold --processes --rounds 8 --seeds 0   # real processes over gRPC

Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fedclient.local_update import round_seed
from fedclient.partition import SCHEMES, Partition
from fedclient.task import Task, TrainConfig
from fedclient.update import round_tensors, train
from fedcore.plugins import load_object
from fedcore.scaffold import control_manifest
from fedcore.tensors import FlatModel, float_vector
from fedserver.strategies import AggregateInput, build_strategy
from fedserver.strategies.base import Strategy


@dataclass(frozen=True)
class Setup:
    task: str = "examples.digits:task"
    clients: int = 10
    partitioner: str = "dirichlet"
    alpha: float = 0.1
    rounds: int = 60
    target: float = 0.9


DISPLACEMENT = "scaffold-displacement"  # c_i⁺ by option II's formula, for comparison


def simulate(setup: Setup, strategy_name: str, seed: int) -> list[float]:
    """Held-out accuracy after each round. DISPLACEMENT: SCAFFOLD with c_i⁺ computed by the
    paper's option II formula c_i - c + (x - y_i)/(K·η_l) (K optimizer steps) instead of the
    mean raw gradient fedclient measures; the two agree for plain SGD, not with momentum."""
    displacement = strategy_name == DISPLACEMENT
    strategy_name = "scaffold" if displacement else strategy_name
    task: Task = load_object(setup.task)
    global_model = task.initial_model(seed)
    model = task.build_model()
    datas = [
        task.load_partition(Partition(i, setup.clients, setup.partitioner, setup.alpha, seed))
        for i in range(setup.clients)
    ]
    defaults = task.default_config()
    strategy: Strategy = build_strategy(strategy_name)
    floats = global_model.manifest.floats()
    d = sum(t.numel for t in floats.tensors)
    c_i = [np.zeros(d, np.float32) for _ in range(setup.clients)]
    test = task.server_test_data()
    history: list[float] = []
    for rnd in range(1, setup.rounds + 1):
        extra = strategy.round_config(rnd)
        sent = strategy.client_tensors(global_model)
        c = float_vector(sent) if sent is not None else None
        total, weight = None, 0.0
        for i, data in enumerate(datas):
            config = TrainConfig(
                defaults.local_epochs,
                defaults.lr,
                defaults.batch_size,
                seed=round_seed(seed, f"client-{i}", rnd),
                extra=extra,
            )
            tensors = round_tensors(floats, config, "")
            control = (c, c_i[i]) if c is not None else None
            trained = train(task, model, data, global_model, config, tensors, None, control)
            if displacement and c is not None:
                n = len(data.train)  # type: ignore[arg-type]
                steps = config.local_epochs * -(-n // config.batch_size)
                delta_y = trained.vector[:d]
                c_plus = c_i[i] - c - delta_y / np.float32(steps * config.lr)
                vector = np.concatenate([delta_y, c_plus - c_i[i]])
                trained = dataclasses.replace(trained, vector=vector, control=c_plus)
            if trained.control is not None:
                c_i[i] = trained.control  # counted: every update is, in-process
            w = float(trained.result.num_examples)
            part = np.float32(w) * trained.vector
            total = part if total is None else total + part
            weight += w
        assert total is not None
        mean = (total / np.float32(weight)).astype(np.float32)
        agg = AggregateInput(rnd, mean, weight, setup.clients, None, population=setup.clients)
        global_model = strategy.apply(global_model, agg)
        history.append(_accuracy(task, model, global_model, test))
    if sent is not None:
        assert sent.manifest == control_manifest(floats)
    return history


def real_run(setup: Setup, strategy_name: str, seed: int, workdir: Path) -> list[float]:
    """The same federation with real processes: `fedserver run` and one `fedclient run` per
    client (ids client-I, --seed and partitions as above), over gRPC on 127.0.0.1. Held-out
    accuracy per round from `fedserver status`."""
    from tests.procs import free_port, start_client, start_coordinator, status_json, wait_serving

    port, run_dir = free_port(), workdir / f"{strategy_name}-seed{seed}"
    state, logs = run_dir / "state", run_dir / "logs"
    server = start_coordinator(
        logs, port, state, "--strategy", strategy_name, "--rounds", str(setup.rounds),
        "--min-clients", str(setup.clients), "--seed", str(seed), "--round-timeout", "600",
        task=setup.task,
    )  # fmt: skip
    procs = [server]
    try:
        wait_serving(port, server)
        data = ("--partitioner", setup.partitioner, "--alpha", str(setup.alpha))
        for i in range(setup.clients):
            own = ("--seed", str(seed), "--state-dir", str(run_dir / f"client-{i}"))
            partition = f"{i}/{setup.clients}"
            procs.append(start_client(logs, port, partition, *data, *own, task=setup.task))
        for proc in procs[1:]:
            assert proc.wait(3600) == 0, proc.log()[-4000:]
        assert server.wait(120) == 0, server.log()[-4000:]
    finally:
        for proc in procs:
            proc.kill()
    return [float(r["metrics"]["accuracy"]) for r in status_json(state)["rounds"]]


def _accuracy(task: Task, model: torch.nn.Module, flat: FlatModel, test: object) -> float:
    from fedcore.tensors import to_state_dict

    model.load_state_dict(to_state_dict(flat))
    metrics = task.evaluate(model, test)  # type: ignore[arg-type]
    return float(metrics["accuracy"]) if np.isfinite(metrics["loss"]) else 0.0


def rounds_to(history: list[float], target: float) -> int | None:
    return next((r for r, acc in enumerate(history, 1) if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=Setup.task)
    parser.add_argument("--clients", type=int, default=Setup.clients)
    parser.add_argument("--partitioner", default=Setup.partitioner, choices=SCHEMES)
    parser.add_argument("--alpha", type=float, default=Setup.alpha)
    parser.add_argument("--rounds", type=int, default=Setup.rounds)
    parser.add_argument("--target", type=float, default=Setup.target)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    parser.add_argument(
        "--displacement",
        action="store_true",
        help=f"also race {DISPLACEMENT}: c_i⁺ by option II's displacement formula (in-process)",
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="run real processes (fedserver run + a fedclient run per client) instead of the "
        "in-process loop; slow: use few --rounds",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-scaffold.json"))
    args = parser.parse_args()
    setup = Setup(args.task, args.clients, args.partitioner, args.alpha, args.rounds, args.target)
    torch.set_num_threads(1)
    print(setup)
    print(
        f"{'strategy':<21} {'seed':>4} {'rounds to target':>17} {'acc@10':>6} {'acc@20':>6} "
        f"{'final':>6} {'best':>6} {'sec':>5}"
    )
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        names = ("fedavg", "scaffold") + ((DISPLACEMENT,) if args.displacement else ())
        for name in names:
            started = time.monotonic()
            if args.processes:
                with tempfile.TemporaryDirectory(prefix="bench-scaffold-") as tmp:
                    hist = real_run(setup, name, seed, Path(tmp))
            else:
                hist = simulate(setup, name, seed)
            took = time.monotonic() - started
            reached = rounds_to(hist, setup.target)
            print(
                f"{name:<21} {seed:>4} {reached if reached else '-':>17} "
                f"{hist[min(9, len(hist) - 1)]:6.3f} {hist[min(19, len(hist) - 1)]:6.3f} "
                f"{hist[-1]:6.3f} {max(hist):6.3f} {took:5.1f}",
                flush=True,
            )
            rows.append(
                {
                    "strategy": name,
                    "seed": seed,
                    "rounds_to_target": reached,
                    "accuracy": hist,
                    "seconds": took,
                }
            )
    out = {"setup": asdict(setup), "processes": args.processes, "results": rows}
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
