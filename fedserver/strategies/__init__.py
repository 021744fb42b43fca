"""Aggregation strategies, one per module; `build_strategy` picks one by name."""

from __future__ import annotations

from fedserver.strategies.base import AggregateInput, Strategy
from fedserver.strategies.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}


def build_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}"
        ) from None


__all__ = ["STRATEGIES", "AggregateInput", "Strategy", "build_strategy"]
