"""Client flags shared by `fedclient run` and `fedserver simulate` (torch-free to import)."""

from __future__ import annotations

import argparse

from fedclient.partition import SCHEMES


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """How the task's data is split across clients, and how updates are encoded."""
    parser.add_argument(
        "--partitioner",
        default="iid",
        choices=SCHEMES,
        help="how the task's data is split across the N partitions (iid)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration for non-IID partitioners (0.5)",
    )
    parser.add_argument(
        "--encoding",
        default="",
        help="update encoding: fp32, fp16, int8, int4 (4-bit, per-64-value scale, with error "
        "feedback) or topk[:FRACTION] (top-k with error feedback, 10%% by default); default: "
        "the one the coordinator's round config names",
    )


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """Where and at what precision local training and evaluation run (fedcore/device.py)."""
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="where the task's default loops train and evaluate: auto (CUDA when available, "
        "else MPS, else CPU), cpu, cuda, cuda:N or mps (auto)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast precision of training and evaluation; fp16 adds gradient scaling. "
        "Weights and updates stay float32 (fp32)",
    )
