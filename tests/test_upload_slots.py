"""Upload slots (a client's streams in flight, all streams in flight) are given back on every
exit path of an upload: success, a refusal, the client cancelling or hitting its deadline while
the coordinator waits for a buffer to be applied, an error. Pure: the real Coordinator and
servicer in process, the stream and the context faked (no sockets)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from examples.digits import task
from fedcore.codecs import get_codec
from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import float_vector
from fedcore.wire import manifest_to_proto
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.coordinator.submissions import MAX_STREAMS_PER_CLIENT
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from fedserver.transport.service import CoordinatorService

pytestmark = pytest.mark.timeout(120)

CLIENT = "a"


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []

    async def abort(self, code: grpc.StatusCode, details: str = "", trailers: Any = ()) -> None:
        self.codes.append(code)
        raise Aborted(details)


def _service(tmp: Path) -> CoordinatorService:
    store = StateStore(tmp / "state")
    policy = RoundPolicy(total_rounds=1, min_clients=1, round_timeout=600.0)
    coord = Coordinator(store, build_strategy("fedavg"), policy, initial_model(task, 0))
    coord.initialize_store("examples.digits:task")
    return CoordinatorService(coord)


async def _stream(c: Coordinator, payload: bytes, digest: str) -> AsyncIterator[pb.UpdateChunk]:
    wire = get_codec("fp32").wire_manifest(c.round_selection().manifest)
    yield pb.UpdateChunk(
        header=pb.UpdateHeader(
            client_id=CLIENT,
            round=c.machine.round,
            base_version=c.model.version,
            num_examples=10,
            encoding="fp32",
            manifest=manifest_to_proto(wire),
            total_bytes=len(payload),
        )
    )
    yield pb.UpdateChunk(data=payload)
    yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest))


def _update(c: Coordinator) -> tuple[bytes, str]:
    payload = np.zeros(float_vector(c.model).size, np.float32).tobytes()
    return payload, hashlib.sha256(payload).hexdigest()


def _receive(s: CoordinatorService, stream: AsyncIterator[pb.UpdateChunk], ctx: Any) -> Any:
    c = s.coordinator
    return s._receive(stream, ctx, c.begin_submit, c.finish_submit)


def test_a_client_cancelling_while_a_buffer_is_applied_gives_its_slots_back(
    tmp_path: Path,
) -> None:
    """The bug: the wait for a buffer being applied (async rounds) sat outside the `try` that
    released the slots, so each cancelled upload kept its client's stream count and one of the
    in-flight slots for good; after two, the client was refused forever (too_many_streams)."""
    service = _service(tmp_path)
    c = service.coordinator
    payload, digest = _update(c)

    async def scenario() -> None:
        c.touch(CLIENT)  # live: the round opens with it selected
        applying = asyncio.Event()  # never set: the buffer is still being applied
        waiting = asyncio.Event()
        calls = 0

        async def settled() -> None:
            nonlocal calls
            calls += 1
            if calls % 2 == 0:  # the wait after the bytes arrived, before they are counted
                waiting.set()
                await applying.wait()

        c.settled = settled  # type: ignore[method-assign]
        for _ in range(MAX_STREAMS_PER_CLIENT + 1):
            waiting.clear()
            task_ = asyncio.create_task(_receive(service, _stream(c, payload, digest), None))
            await asyncio.wait_for(waiting.wait(), 30)
            assert c.uploads.in_flight == 1 and c.uploads.streams[CLIENT] == 1
            task_.cancel()  # the client went away (or its deadline passed)
            with pytest.raises(asyncio.CancelledError):
                await task_
            assert c.uploads.in_flight == 0
            assert dict(c.uploads.streams) == {}

        async def no_wait() -> None:
            return None

        c.settled = no_wait  # type: ignore[method-assign]
        result = await _receive(service, _stream(c, payload, digest), FakeContext())
        assert result.round == 1 and not result.duplicate

    asyncio.run(scenario())
    assert c.uploads.in_flight == 0
    assert dict(c.uploads.streams) == {}


def test_refused_and_failed_uploads_leave_no_slot_and_no_zero_entry(tmp_path: Path) -> None:
    """A bad digest (refused after the bytes), an error while counting, and a success: the
    per-client map holds only clients with an upload in flight, never a zero count."""
    service = _service(tmp_path)
    c = service.coordinator
    payload, digest = _update(c)

    async def scenario() -> None:
        c.touch(CLIENT)
        ctx = FakeContext()
        with pytest.raises(Aborted):
            await _receive(service, _stream(c, payload, "0" * 64), ctx)
        assert ctx.codes == [grpc.StatusCode.INVALID_ARGUMENT]
        assert (c.uploads.in_flight, dict(c.uploads.streams)) == (0, {})

        def broken(*_: object) -> None:
            raise OSError("disk full")

        real = c.intake._count
        c.intake._count = broken  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await _receive(service, _stream(c, payload, digest), FakeContext())
        assert (c.uploads.in_flight, dict(c.uploads.streams)) == (0, {})
        c.intake._count = real  # type: ignore[method-assign]

        await _receive(service, _stream(c, payload, digest), FakeContext())
        assert (c.uploads.in_flight, dict(c.uploads.streams)) == (0, {})

    asyncio.run(scenario())
