"""A round mode in one module, for tests/test_modes.py: `--mode first-k --first-k N` closes
each round at its first N updates instead of waiting for every selected client. Registered by
one line (the test's monkeypatch.setitem(MODES, "first-k", FirstK)), as docs/modes.md says."""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass

from fedcore.config import positive_int
from fedserver.modes.base import Flag
from fedserver.modes.synchronous import FedAvg
from fedserver.rounds.synchronous import Phase, RoundMachine, RoundPolicy


@dataclass
class FirstKMachine(RoundMachine):
    first_k: int = 1

    def step(self) -> str | None:
        if self.phase is Phase.COLLECTING and len(self.receipts) >= self.first_k:
            return "close"
        return super().step()


class FirstK(FedAvg):
    name = "first-k"
    help = "synchronous rounds that close at their first --first-k updates"
    flags = (Flag("first-k", positive_int, "N", "updates that close a round (needed)"),)

    def __init__(self, first_k: int) -> None:
        self.first_k = first_k

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FirstK:
        if args.first_k is None:
            raise ValueError("--mode first-k needs --first-k N")
        return cls(args.first_k)

    def machine(
        self,
        policy: RoundPolicy,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        round: int,
        joined: Callable[[str], bool],
    ) -> RoundMachine:
        return FirstKMachine(policy, clock=clock, rng=rng, round=round, first_k=self.first_k)
