"""--mode async: buffered asynchronous FedAvg (FedBuff). Clients train whenever they are free;
every --buffer-size deltas make a new version (rounds/buffered.py folds them through
protocols/buffered.py, each weighed by its staleness)."""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Callable
from typing import Any

from fedcore.config import positive_int
from fedserver.modes.base import Flag, RoundMode
from fedserver.rounds.buffered import AsyncPolicy, BufferMachine
from fedserver.rounds.staleness import StalenessWeight
from fedserver.rounds.synchronous import RoundMachine, RoundPolicy
from fedserver.strategies import Strategy


class Buffered(RoundMode):
    name = "async"
    help = (
        "buffered asynchronous FedAvg (FedBuff), clients train whenever they are free and "
        "every --buffer-size deltas make a new version"
    )
    group = "asynchronous aggregation (--mode async; docs/modes.md)"
    # The first is needed; the others are AsyncPolicy fields (staleness-weight: `weight`).
    flags = (
        Flag(
            "buffer-size",
            positive_int,
            "K",
            "deltas folded per server step; each step publishes a new version (needed)",
        ),
        Flag(
            "max-staleness",
            int,
            "S",
            "refuse deltas based on a version more than S versions old (10)",
        ),
        Flag(
            "staleness-weight",
            str,
            "FN",
            "weight of a delta by its staleness t: constant, poly:A = (1+t)^-A, or hinge:A,B "
            "= 1 up to t=B, then 1/(A(t-B)+1) (poly:0.5)",
        ),
        Flag(
            "max-concurrency",
            int,
            "M",
            "at most M clients training at once; the others wait in their long-poll (0: all)",
        ),
        Flag(
            "max-contributions",
            int,
            "L",
            "a client contributes to at most L of any --contribution-window versions, while "
            "enough clients are live to fill the buffers without it (5; 0: no limit)",
        ),
        Flag(
            "contribution-window",
            positive_int,
            "W",
            "the window of versions --max-contributions counts in (10)",
        ),
        Flag(
            "max-weight-ratio",
            float,
            "R",
            "a delta weighs at most R times the median num_examples of recent clients "
            "(4; 0: no cap)",
        ),
    )
    pinned = ("buffer-size",)

    def __init__(self, policy: AsyncPolicy) -> None:
        self.policy = policy

    def simulation_wave(self) -> int:
        """Nobody is selected, so the simulation has clients pull: --max-concurrency of them
        at once (every training slot), else one buffer's worth (--buffer-size)."""
        return self.policy.max_concurrency or self.policy.buffer_size

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Buffered:
        if args.buffer_size is None:
            raise ValueError("--mode async needs --buffer-size K (deltas per server step, e.g. 5)")
        given: dict[str, object] = {
            f.dest: getattr(args, f.dest)
            for f in cls.flags[1:]
            if getattr(args, f.dest) is not None and f.dest != "staleness_weight"
        }
        if args.staleness_weight is not None:
            given["weight"] = StalenessWeight.parse(args.staleness_weight)
        return cls(AsyncPolicy(args.buffer_size, **given))  # type: ignore[arg-type]

    def refuse(self, secure: str, strategy: Strategy) -> str | None:
        """It combines with what folds one update at a time into a mean; not the rest."""
        if secure != "none":
            return (
                f"--mode async cannot be combined with --secure {secure}: masks and ciphertexts "
                "only cancel out or decrypt as the sum of one synchronous round's fixed set of "
                "clients, while an asynchronous buffer takes whoever finishes first; use "
                "--mode fedavg with --secure, or --mode async without it (--dp-clip still works)"
            )
        if strategy.needs_all_updates:
            return (
                f"--mode async cannot be combined with strategy {strategy.name}: it folds each "
                "delta into a running mean as it arrives; use fedavg, fedprox, fedavgm or a "
                "FedOpt strategy"
            )
        return None

    def machine(
        self,
        policy: RoundPolicy,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        round: int,
        joined: Callable[[str], bool],
    ) -> RoundMachine:
        return BufferMachine(
            policy, clock=clock, rng=rng, round=round, buffering=self.policy, joined=joined
        )

    def protocol(self, secure: str) -> str:
        return "buffered"

    def protocol_settings(self) -> dict[str, Any]:
        return {"staleness": self.policy.weight, "max_weight_ratio": self.policy.max_weight_ratio}

    def updates_per_round(self, policy: RoundPolicy) -> int:
        return self.policy.buffer_size  # a version is one buffer of K

    def pinned_values(self) -> dict[str, str]:
        return {"buffer_size": str(self.policy.buffer_size)}

    def tracked_params(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.policy), "weight": str(self.policy.weight)}
