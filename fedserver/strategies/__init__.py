"""Aggregation strategies, one per module; `build_strategy` picks one by name.

Parameters are constructor keyword arguments; the CLI passes only the flags the operator set,
so each strategy keeps its own defaults, and a flag the chosen strategy does not take is an
error rather than silently ignored.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedserver.strategies.base import AggregateInput, Strategy, UpdateSet
from fedserver.strategies.bulyan import Bulyan
from fedserver.strategies.fedadagrad import FedAdagrad
from fedserver.strategies.fedadam import FedAdam
from fedserver.strategies.fedavg import FedAvg
from fedserver.strategies.fedavgm import FedAvgM
from fedserver.strategies.fedprox import FedProx
from fedserver.strategies.fedyogi import FedYogi
from fedserver.strategies.krum import Krum
from fedserver.strategies.median import Median
from fedserver.strategies.qfedavg import QFedAvg
from fedserver.strategies.scaffold import Scaffold
from fedserver.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        Median,
        TrimmedMean,
        Krum,
        Bulyan,
        QFedAvg,
        Scaffold,
    )
}


def strategy_parameters(name: str) -> list[str]:
    """Keyword parameters the named strategy accepts (e.g. ["server_lr", "server_momentum"])."""
    init = STRATEGIES[name].__init__
    if init is object.__init__:
        return []
    return [p for p in inspect.signature(init).parameters if p != "self"]


def build_strategy(name: str, **params: Any) -> Strategy:
    """The named strategy; `params` holds only the parameters the operator set."""
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}"
        )
    accepted = strategy_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        flags = ", ".join("--" + p.replace("_", "-") for p in unknown)
        takes = ", ".join("--" + p.replace("_", "-") for p in accepted) or "no parameters"
        raise ValueError(f"strategy {name} does not use {flags} (it takes {takes})")
    return STRATEGIES[name](**params)


__all__ = [
    "STRATEGIES",
    "AggregateInput",
    "Strategy",
    "UpdateSet",
    "build_strategy",
    "strategy_parameters",
]
