"""SCAFFOLD's Δc from hostile clients, against the real Coordinator and servicer in process
(the stream and the context faked, no sockets): every bad Δc is refused with a specific status
before it is folded, the global c stays what the honest updates make it, and no refused or
broken upload leaves a spill file open."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from examples.digits import task
from fedcore.proto import coordinator_pb2 as pb
from fedcore.scaffold import CONTROL_PREFIX
from fedcore.tensors import Manifest, float_vector
from fedcore.wire import manifest_to_proto
from fedserver.coordinator.central_eval import initial_model
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.protocols.secagg_stages import SecAggFailed
from fedserver.rounds.synchronous import RoundPolicy
from fedserver.state.store import StateStore
from fedserver.strategies import build_strategy
from fedserver.transport.service import CoordinatorService
from tests.test_upload_slots import Aborted, FakeContext

pytestmark = pytest.mark.timeout(120)
HONEST, OTHER = "a", "b"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _service(tmp: Path, strategy: str = "scaffold") -> CoordinatorService:
    store = StateStore(tmp / "state")
    policy = RoundPolicy(total_rounds=2, min_clients=2, round_timeout=600.0)
    coord = Coordinator(store, build_strategy(strategy), policy, initial_model(task, 0))
    coord.initialize_store("examples.digits:task")
    return CoordinatorService(coord)


async def _stream(
    c: Coordinator,
    manifest: Manifest,
    payload: bytes,
    client: str = HONEST,
    num_examples: int = 10,
    trailer: bool = True,
) -> AsyncIterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(
        header=pb.UpdateHeader(
            client_id=client,
            round=c.machine.round,
            base_version=c.model.version,
            num_examples=num_examples,
            encoding="fp32",
            manifest=manifest_to_proto(manifest),
            total_bytes=len(payload),
        )
    )
    for start in range(0, len(payload), 1 << 16):
        yield pb.UpdateChunk(data=payload[start : start + (1 << 16)])
    if trailer:
        yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=hashlib.sha256(payload).hexdigest()))


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bad_delta_c_is_refused_before_the_fold_and_c_stays_the_honest_mean(
    tmp_path: Path,
) -> None:
    service = _service(tmp_path)
    c = service.coordinator
    d = float_vector(c.model).size
    exchanged = c.round_selection().manifest  # floats, then one Δc per float tensor
    assert exchanged.tensors[-1].name.startswith(CONTROL_PREFIX)
    floats_only = Manifest(exchanged.tensors[: len(exchanged.tensors) // 2])

    def pair(dy: float, dc: float) -> np.ndarray:
        return np.concatenate([np.full(d, dy, np.float32), np.full(d, dc, np.float32)])

    async def refused(stream: AsyncIterator[pb.UpdateChunk]) -> tuple[grpc.StatusCode, str]:
        ctx = FakeContext()
        with pytest.raises(Aborted) as info:
            await service._receive(stream, ctx, c.begin_submit, c.finish_submit)
        return ctx.codes[-1], str(info.value)

    async def scenario() -> None:
        c.touch(HONEST)
        c.touch(OTHER)
        assert c.machine.round == 1
        files = _open_files()
        nan, huge = pair(0.1, 0.0), pair(0.1, 0.0)
        nan[d + 5], huge[d + 5] = np.nan, 1e30
        wrong_shape = list(exchanged.tensors)
        last = wrong_shape[-1]
        wrong_shape[-1] = type(last)(last.name, last.dtype, (*last.shape[:-1], last.shape[-1] + 1))
        renamed = list(exchanged.tensors)
        renamed[-1] = type(last)(CONTROL_PREFIX + "not.a.tensor", last.dtype, last.shape)
        cases = [
            # Δc NaN / huge: refused while streaming, nothing folded.
            (_stream(c, exchanged, nan.tobytes()), INVALID, "NaN or Inf (first at value"),
            (_stream(c, exchanged, huge.tobytes()), INVALID, "beyond --max-update-value"),
            # Δc missing, misnamed, misshaped: refused at the header.
            (
                _stream(c, floats_only, pair(0.1, 0)[:d].tobytes()),
                INVALID,
                "strategy scaffold; send every tensor of the round",
            ),
            (
                _stream(c, Manifest(tuple(renamed)), pair(0.1, 0).tobytes()),
                INVALID,
                "not trained this round: ['scaffold.delta_c:not.a.tensor']",
            ),
            (_stream(c, Manifest(tuple(wrong_shape)), pair(0.1, 0).tobytes()), INVALID, "shape"),
            # Δc from a client that is not in the round.
            (
                _stream(c, exchanged, pair(0.1, 5.0).tobytes(), client="stranger"),
                grpc.StatusCode.PERMISSION_DENIED,
                "not selected",
            ),
            # More bytes than the header declared, and a stream that stops before its trailer.
            (
                _oversized(c, exchanged, pair(0.1, 0).tobytes()),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "exceeds",
            ),
            (_stream(c, exchanged, pair(0.1, 0).tobytes(), trailer=False), INVALID, "ended"),
        ]
        for stream, code, words in cases:
            got, message = await refused(stream)
            assert (got, words in message) == (code, True), message
            assert c.uploads.in_flight == 0 and dict(c.uploads.streams) == {}
            assert c.machine.receipts == {}  # nothing counted
            # The spill of every refused stream is given back: one file, kept for the next.
            assert c.uploads.spills.idle == 1
            assert _open_files() == files + 1
        assert c.strategy.control is None  # c untouched: still 0
        for client, dc in ((HONEST, 1.0), (OTHER, 3.0)):
            stream = _stream(c, exchanged, pair(0.5, dc).tobytes(), client=client)
            await service._receive(stream, FakeContext(), c.begin_submit, c.finish_submit)
        await asyncio.wait_for(_round_closed(c), 60)

    asyncio.run(scenario())
    # c = 0 + (2/2) * mean(1, 3): the refused Δc left no trace.
    control = c.strategy.state_arrays()["control"]
    np.testing.assert_array_equal(control, np.full(d, 2.0, np.float32))
    assert c.failure is None


async def _oversized(
    c: Coordinator, manifest: Manifest, payload: bytes
) -> AsyncIterator[pb.UpdateChunk]:
    """A header announcing `payload`, then one chunk more than it announced."""
    async for chunk in _stream(c, manifest, payload, trailer=False):
        yield chunk
    yield pb.UpdateChunk(data=b"\0" * 8)


async def _round_closed(c: Coordinator) -> None:
    while c.machine.rounds_completed < 1:
        await asyncio.sleep(0.01)


def test_delta_c_sent_to_a_coordinator_without_scaffold_is_refused(tmp_path: Path) -> None:
    service = _service(tmp_path, "fedavg")
    c = service.coordinator
    scaffold = build_strategy("scaffold").exchanged(c.model.manifest.floats())
    d = float_vector(c.model).size
    payload = np.zeros(2 * d, np.float32).tobytes()

    async def scenario() -> tuple[list[grpc.StatusCode], str]:
        c.touch(HONEST)
        c.touch(OTHER)
        ctx = FakeContext()
        with pytest.raises(Aborted) as info:
            await service._receive(
                _stream(c, scaffold, payload), ctx, c.begin_submit, c.finish_submit
            )
        return ctx.codes, str(info.value)

    codes, message = asyncio.run(scenario())
    assert (
        codes == [INVALID]
        and "manifest lists 8 tensors; an update of this model has at most 4" in message
    )


def test_a_secure_round_clients_fail_is_one_error_line_never_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Under --secure he, a client encrypting 1e30 makes the decrypted sum out of range: every
    # key holder's decryption is refused and the round fails (SecAggFailed). That is the
    # clients' doing, like too few secagg survivors: it was logged with a traceback.
    c = _service(tmp_path, "fedavg").coordinator
    why = "no key holder returned the decrypted aggregate of round 1"

    async def failing(closed: object) -> None:
        raise SecAggFailed(why)

    c._aggregate_round = failing  # type: ignore[method-assign,assignment]
    asyncio.run(c._finish_round(SimpleNamespace(round=1)))  # type: ignore[arg-type]
    assert c.failure == f"aggregating round 1 failed: {why}"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [c.failure]
    assert all(r.exc_info is None for r in caplog.records)
