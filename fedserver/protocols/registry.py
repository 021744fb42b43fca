"""Which round protocol a name stands for: the `--secure` flag, or the one a round mode picks
(fedserver/modes). Adding a protocol: write its module (a RoundProtocol subclass taking
(ProtocolSettings, ProtocolEnv)) and add one line here. Wrappers (differential privacy,
protocols/dp.py) go around whichever protocol is built here."""

from __future__ import annotations

from collections.abc import Sequence

from fedcore.tensors import Manifest
from fedserver.protocols.base import ProtocolEnv, ProtocolSettings, ProtocolWrapper, RoundProtocol
from fedserver.protocols.buffered import BufferedProtocol
from fedserver.protocols.he import HEProtocol
from fedserver.protocols.plain import PlainProtocol
from fedserver.protocols.secagg import SecAggProtocol

PROTOCOLS: dict[str, type[RoundProtocol]] = {
    "none": PlainProtocol,
    "secagg": SecAggProtocol,
    "he": HEProtocol,
    "buffered": BufferedProtocol,  # chosen by --mode async (modes/buffered.py), not --secure
}
# What --secure offers: the protocols that protect updates (a mode may pick another one).
SECURE_CHOICES = ["none", "secagg", "he"]


def protocol_refusal(
    settings: ProtocolSettings, wrappers: Sequence[ProtocolWrapper] = ()
) -> str | None:
    """Why these wrappers cannot go around this protocol (checked before anything is built)."""
    protocol = _protocol_class(settings.name)
    return next((why for w in wrappers if (why := w.refuse(protocol, settings))), None)


def update_manifest(
    settings: ProtocolSettings, floats: Manifest, wrappers: Sequence[ProtocolWrapper] = ()
) -> Manifest:
    """What an update carries: the strategy's tensors (`floats`), then what wrappers add
    (adaptive DP clipping's masked bit under secagg/he)."""
    protocol = _protocol_class(settings.name)
    for w in wrappers:
        floats = w.exchanged(protocol, floats)
    return floats


def build_protocol(
    settings: ProtocolSettings, env: ProtocolEnv, wrappers: Sequence[ProtocolWrapper] = ()
) -> RoundProtocol:
    if why := protocol_refusal(settings, wrappers):
        raise ValueError(why)
    inner = settings
    for w in wrappers:
        inner = w.inner_settings(inner)
    protocol = _protocol_class(settings.name)(inner, env)
    for w in wrappers:
        protocol = w.wrap(protocol, env)
    return protocol


def _protocol_class(name: str) -> type[RoundProtocol]:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(
            f"unknown round protocol {name!r}; known: {', '.join(PROTOCOLS)}"
        ) from None
