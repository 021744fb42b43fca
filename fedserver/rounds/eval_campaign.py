"""Federated evaluation: selected clients score a global model on their own test data.

Pure Python (no gRPC): the coordinator opens a campaign when it publishes the model of round r
(every `--eval-every` rounds, and always for the final model), picks a fraction of the live
clients, and folds their reports into example-weighted means stored as round r's metrics
"fed_<metric>" (plus "fed_examples", "fed_clients"), next to the coordinator's own evaluation
of the same model. A campaign ends when the next model is published; late reports are stale.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedcore.limits import MAX_ROUND_METRICS, excerpt
from fedserver.rounds.population import SortedIds
from fedserver.rounds.synchronous import NotSelected, StaleRound

PREFIX = "fed_"


@dataclass(frozen=True)
class EvalPolicy:
    every: int = 0  # 0: off
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval-every must be >= 0, got {self.every}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction-evaluate must be in (0, 1], got {self.fraction}")

    def due(self, round_number: int, total_rounds: int) -> bool:
        """Is the model published after `round_number` evaluated by clients?"""
        if self.every <= 0 or round_number < 1:
            return False
        return round_number % self.every == 0 or round_number == total_rounds

    def sample(self, live: Sequence[str], rng: random.Random) -> frozenset[str]:
        k = min(len(live), max(1, math.ceil(self.fraction * len(live))))
        # A population's live clients come sorted already (and lazy: sorting would list them).
        ordered = live if isinstance(live, SortedIds) else sorted(live)
        return frozenset(rng.sample(ordered, k))


@dataclass
class EvalCampaign:
    round: int  # the model after this round is being evaluated
    version: str
    selected: frozenset[str]
    reports: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)
    examples: int = 0
    scoring: int = 0  # reports with at least one example
    sums: Counter[str] = field(default_factory=Counter)
    weights: Counter[str] = field(default_factory=Counter)

    def pending(self, client_id: str) -> bool:
        return client_id in self.selected and client_id not in self.reports

    def accept(
        self,
        client_id: str,
        round_number: int,
        version: str,
        num_examples: int,
        metrics: Mapping[str, float],
    ) -> bool:
        """Record a report; True if it is new, False for a repeat (not counted twice)."""
        if round_number != self.round or version != self.version:
            raise StaleRound(
                f"evaluation of round {round_number} is closed; the model being evaluated is "
                f"round {self.round} ({self.version[:12]})"
            )
        if client_id not in self.selected:
            raise NotSelected(
                f"client {excerpt(client_id)} is not selected to evaluate round {self.round}"
            )
        if client_id in self.reports:
            return False
        self.reports[client_id] = (num_examples, dict(metrics))
        # Running sums: summary() after every report must not cost O(reports) each time.
        self.examples += num_examples
        if num_examples > 0:
            self.scoring += 1
            for key, value in metrics.items():
                self.sums[key] += value * num_examples
                self.weights[key] += num_examples
        return True

    def summary(self) -> dict[str, float]:
        """Example-weighted means as fed_<metric>; clients without test data weigh nothing.

        At most MAX_ROUND_METRICS names (those most examples reported), so the round's record
        stays bounded however many different names the clients send."""
        out: dict[str, float] = {
            PREFIX + "examples": float(self.examples),
            PREFIX + "clients": float(self.scoring),
        }
        if self.examples == 0:
            return out
        kept = sorted(
            (k for k in self.weights if self.weights[k]), key=lambda k: (-self.weights[k], k)
        )
        for key in sorted(kept[:MAX_ROUND_METRICS]):
            out[PREFIX + key] = self.sums[key] / self.weights[key]
        return out
