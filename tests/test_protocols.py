"""The round-protocol interface: a protocol registered by one line is driven by the real
Coordinator through its verbs, and can hold a round open (can_close) until it is ready."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest

from examples.digits import task
from fedcore.codecs import get_codec
from fedcore.tensors import float_vector
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.protocols.base import Aggregate, Contribution, Opening
from fedserver.protocols.plain import PlainProtocol
from fedserver.protocols.registry import PROTOCOLS
from fedserver.rounds.synchronous import Phase, RoundPolicy
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from fedserver.updates.messages import SubmitHeader

pytestmark = pytest.mark.timeout(60)


class Recording(PlainProtocol):
    """Plain aggregation that logs every verb and closes only when allowed."""

    calls: list[str] = []
    allow_close = False

    def open(self, opening: Opening) -> None:
        self.calls.append(f"open {opening.round} fresh={opening.fresh}")
        super().open(opening)

    def accept(self, c: Contribution) -> None:
        self.calls.append(f"accept {c.client_id} weight={c.weight:g}")
        super().accept(c)

    def can_close(self) -> bool:
        self.calls.append(f"can_close {self.allow_close}")
        return self.allow_close

    async def aggregate(self) -> Aggregate:
        self.calls.append("aggregate")
        return await super().aggregate()

    def release(self) -> None:
        self.calls.append("release")
        super().release()


async def _scenario(state: Path) -> tuple[Coordinator, np.ndarray, np.ndarray]:
    base = initial_model(task, 0)
    store = StateStore(state)
    coord = Coordinator(
        store, build_strategy("fedavg"), RoundPolicy(total_rounds=1), base, secure="recording"
    )
    protocol = coord.protocol
    assert isinstance(protocol, Recording)
    coord.initialize_store("examples.digits:task")
    for c in ("a", "b"):
        coord.touch(c, {})
    assert coord.machine.phase is Phase.COLLECTING
    rng = np.random.default_rng(7)
    n = float_vector(base).size
    deltas = {c: rng.normal(0, 0.01, n).astype(np.float32) for c in ("a", "b")}
    weights = {"a": 30, "b": 10}
    codec = get_codec("fp32")
    wire = codec.wire_manifest(base.manifest.floats())
    for c, delta in deltas.items():
        payload = codec.encode(delta).tobytes()
        header = SubmitHeader(c, 1, base.version, weights[c], {}, "fp32", wire, len(payload))
        pending = coord.begin_submit(header)
        pending.receiver.add(payload)
        coord.finish_submit(pending, hashlib.sha256(payload).hexdigest())
    # Everyone reported: the round machine proposes to close, the protocol holds it open.
    assert coord.machine.phase is Phase.COLLECTING
    protocol.allow_close = True
    coord.touch("a")
    await asyncio.wait_for(coord.done.wait(), 30)
    want = (deltas["a"].astype(np.float64) * 30 + deltas["b"].astype(np.float64) * 10) / 40
    got = float_vector(coord.model).astype(np.float64) - float_vector(base)
    store.close()
    return coord, got, want


def test_a_registered_protocol_is_driven_through_its_verbs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PROTOCOLS, "recording", Recording)
    monkeypatch.setattr(Recording, "calls", [])
    coord, got, want = asyncio.run(_scenario(tmp_path / "state"))
    assert coord.failure is None and coord.machine.rounds_completed == 1
    assert np.max(np.abs(got - want)) < 1e-6
    calls = Recording.calls
    assert calls[:3] == ["open 1 fresh=True", "accept a weight=30", "accept b weight=10"]
    assert "can_close False" in calls
    assert calls[-3:] == ["can_close True", "aggregate", "release"]


def test_unknown_protocol_names_are_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    try:
        with pytest.raises(ValueError, match="unknown round protocol 'nope'"):
            Coordinator(
                store,
                build_strategy("fedavg"),
                RoundPolicy(total_rounds=1),
                initial_model(task, 0),
                secure="nope",
            )
    finally:
        store.close()
