"""Does federated LoRA work? Held-out perplexity on the stdlib example (docs/llm.md).

For each scheme (FedIT, FFA-LoRA), on `examples/stdlib_lm.py`'s 10 clients:
(a) the pre-trained base; (b) each client's LoRA trained alone for the whole budget (mean over
clients); (c) federated LoRA, FedAvg of the exchanged adapters; (d) centralized LoRA on the
pooled client data, the same number of passes over it. Every model is scored on every
client's held-out files: "own" is the mean over clients of the perplexity on their own
held-out split, "pooled" the perplexity over all held-out tokens together. Bytes: one client's
upload per round (fp32 adapters) against the full model's bytes.

The federation runs in this process with the clients' own code (`fedclient.local_update`, the
same function a `fedclient` process and `fedserver simulate` run) and FedAvg's example-weighted
mean of the deltas (server lr 1): no gRPC, so what differs between runs is the algorithm only.

    .venv/bin/python -m bench.lora --rounds 4 --train-blocks 64 --test-blocks 32
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from examples.stdlib_lm import CLIENT_PACKAGES, FULL, StdlibLM
from fedclient.local_update import local_update, round_seed
from fedclient.partition import Partition
from fedclient.task import LocalData, TrainConfig
from fedcore.selection import Selection
from fedcore.tensors import FlatModel, float_vector, to_state_dict, with_float_vector


def _scores(task: StdlibLM, model: Any, datas: list[LocalData]) -> tuple[float, float]:
    """(mean over clients of own held-out perplexity, pooled held-out perplexity)."""
    losses, sizes = [], []
    for data in datas:
        assert data.test is not None
        losses.append(task.evaluate(model, data.test)["loss"])
        sizes.append(len(data.test))  # type: ignore[arg-type]
    own = float(np.mean([math.exp(v) for v in losses]))
    pooled = math.exp(float(np.average(losses, weights=sizes)))
    return own, pooled


def _train(
    task: StdlibLM, model: Any, data: Any, start: FlatModel, cfg: TrainConfig, passes: int
) -> None:
    model.load_state_dict(task_state(start))
    for p in range(passes):
        task.train(model, data, dataclasses.replace(cfg, seed=p))


def task_state(flat: FlatModel) -> dict[str, torch.Tensor]:
    return to_state_dict(flat)


def run_scheme(scheme: str, args: argparse.Namespace) -> dict[str, Any]:
    size = dataclasses.replace(FULL, train_blocks=args.train_blocks, test_blocks=args.test_blocks)
    task = StdlibLM(scheme=scheme, rank=args.rank, alpha=args.alpha, size=size)
    cfg = TrainConfig(local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size)
    n = args.clients
    datas = [task.load_partition(Partition(i, n)) for i in range(n)]
    torch.manual_seed(0)
    model = task.build_model()
    start = task.initial_model(0)
    full_bytes = 4 * sum(
        p.numel() for name, p in model.lm.named_parameters() if "lora_" not in name
    )
    row: dict[str, Any] = {"scheme": scheme, "upload": start.buffer.size, "full": full_bytes}
    t0 = time.monotonic()
    model.load_state_dict(task_state(start))
    row["base"] = _scores(task, model, datas)

    own = []  # (b) each client alone, the whole budget on its own data
    for data in datas:
        _train(task, model, data.train, start, cfg, args.rounds)
        own.append(_scores(task, model, [data])[0])
    row["local"] = (float(np.mean(own)), float("nan"))

    # (c) federated: every client every round, FedAvg of the adapter deltas
    current = start
    selection = Selection.matching(start.manifest.floats(), "*")
    for r in range(1, args.rounds + 1):
        deltas, weights = [], []
        for i, data in enumerate(datas):
            config = dataclasses.replace(cfg, seed=round_seed(0, f"client-{i}", r))
            result, delta = local_update(task, model, data, current, config, selection)
            deltas.append(delta)
            weights.append(result.num_examples)
        mean = np.average(np.stack(deltas), axis=0, weights=weights).astype(np.float32)
        current = with_float_vector(current, float_vector(current) + mean)
        model.load_state_dict(task_state(current))
        print(f"  {scheme} round {r}: pooled {_scores(task, model, datas)[1]:.3f}", flush=True)
    row["federated"] = _scores(task, model, datas)

    # (d) centralized: the pooled client data, as many passes as a client made
    pooled = ConcatDataset([d.train for d in datas])
    _train(task, model, pooled, start, cfg, args.rounds)
    row["central"] = _scores(task, model, datas)
    row["seconds"] = time.monotonic() - t0
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="fedit,ffa", help="comma-separated: fedit, ffa")
    parser.add_argument("--clients", type=int, default=len(CLIENT_PACKAGES), help="1..10")
    parser.add_argument("--rounds", type=int, default=4, help="federated rounds")
    parser.add_argument("--local-epochs", type=int, default=1, help="per round")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per step")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--train-blocks", type=int, default=64, help="per client, 128 B each")
    parser.add_argument("--test-blocks", type=int, default=32, help="held out per client")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = [run_scheme(s, args) for s in args.schemes.split(",")]
    print()
    print(
        "| scheme | base own / pooled | local-only own | federated own / pooled | "
        "centralized own / pooled | fed / central (pooled) | upload per client-round |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["federated"][1] / r["central"][1]
        share = r["upload"] / r["full"]
        print(
            f"| {r['scheme']} | {r['base'][0]:.3f} / {r['base'][1]:.3f} | {r['local'][0]:.3f} | "
            f"{r['federated'][0]:.3f} / {r['federated'][1]:.3f} | {r['central'][0]:.3f} / "
            f"{r['central'][1]:.3f} | {ratio:.3f} | {r['upload']:,} B = {share:.2%} of "
            f"{r['full']:,} B |"
        )
    took = ", ".join(f"{r['scheme']} {r['seconds']:.0f} s" for r in rows)
    print(f"\n({took}; {args.clients} clients, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
