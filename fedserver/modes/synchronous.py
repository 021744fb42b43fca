"""Synchronous rounds (rounds/synchronous.py): the coordinator selects clients, waits for
their updates until the round's deadline and folds them with the --secure protocol."""

from __future__ import annotations

from fedserver.modes.base import RoundMode


class FedAvg(RoundMode):
    name = "fedavg"
    help = "clients train locally and send a delta"


class FedSGD(FedAvg):
    name = "fedsgd"
    help = "clients send one gradient and the strategy applies the average (plain SGD: --server-lr)"
    client_update = "fedsgd"
