"""Which round protocol a name stands for: the `--secure` flag, or the one a round mode picks
(fedserver/modes). Adding a protocol: write its module (a RoundProtocol subclass taking
(ProtocolSettings, ProtocolEnv)) and add one line here."""

from __future__ import annotations

from collections.abc import Callable

from fedserver.protocols.base import ProtocolEnv, ProtocolSettings, RoundProtocol
from fedserver.protocols.buffered import BufferedProtocol
from fedserver.protocols.he import HEProtocol
from fedserver.protocols.plain import PlainProtocol
from fedserver.protocols.secagg import SecAggProtocol

PROTOCOLS: dict[str, Callable[[ProtocolSettings, ProtocolEnv], RoundProtocol]] = {
    "none": PlainProtocol,
    "secagg": SecAggProtocol,
    "he": HEProtocol,
    "buffered": BufferedProtocol,  # chosen by --mode async (modes/buffered.py), not --secure
}
# What --secure offers: the protocols that protect updates (a mode may pick another one).
SECURE_CHOICES = ["none", "secagg", "he"]


def build_protocol(settings: ProtocolSettings, env: ProtocolEnv) -> RoundProtocol:
    try:
        factory = PROTOCOLS[settings.name]
    except KeyError:
        raise ValueError(
            f"unknown round protocol {settings.name!r}; known: {', '.join(PROTOCOLS)}"
        ) from None
    return factory(settings, env)
