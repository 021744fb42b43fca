"""Anything a client can send is an expected event: a batch of hostile inputs to a real
coordinator leaves one log line per refusal and no Python traceback in its log (a flood of
tracebacks fills the disk and hides real faults).

The inputs: bytes that are not protobuf, invalid UTF-8 and out-of-range numbers in every field of
every RPC's request, broken upload streams (empty, data first, two headers, data after the
trailer, no trailer, a corrupt chunk), and calls the client abandons: cancelled or past their
deadline in the middle of an upload or a long-poll. Refusing a call whose client is already gone
used to fail inside gRPC and log a traceback."""

from __future__ import annotations

import hashlib
import re
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.privacy import with_masked_bit
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.scaffold import exchanged
from fedcore.tensors import Manifest
from fedcore.wire import CHANNEL_OPTIONS, manifest_to_proto
from tests.procs import Proc, free_port, start_coordinator, wait_serving, wait_until
from tests.raw_client import pull

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
CLIENT = "x"
# Statuses of the coordinator's own refusals (gRPC's own, e.g. for a message above 8 MiB, never
# reach a handler and are not logged by it).
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
REFUSAL_LINE = re.compile(r" refused \((\w+)\): ")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = b""
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _hostile_requests(method: object) -> Iterator[bytes]:
    """Not protobuf at all, and every field of the request type with a hostile value (after a
    valid client_id where the request has one, so the checks behind it are reached too)."""
    desc = method.input_type  # type: ignore[attr-defined]
    yield from (b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10)
    named = desc.fields_by_name.get("client_id")
    prefix = _bytes_field(named.number, CLIENT.encode()) if named else b""
    for f in desc.fields:
        for value in (
            _bytes_field(f.number, b"\xff\xfe"),  # invalid UTF-8 / a broken sub-message
            _field(f.number, 0, _varint(-1)),
            _field(f.number, 0, _varint(1 << 63)),
            _field(f.number, 1, struct.pack("<d", float("nan"))),
            _field(f.number, 1, struct.pack("<d", -1e308)),
        ):
            yield prefix + value


def _call(channel: grpc.Channel, rpc: str, messages: list[bytes], timeout: float = 30) -> object:
    method = SERVICE.methods_by_name[rpc]
    path = f"/{SERVICE.full_name}/{rpc}"
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(messages), timeout=timeout)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(messages[0], timeout=timeout):
                pass
        else:
            channel.unary_unary(path)(messages[0], timeout=timeout)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _refusal_lines(server: Proc) -> Counter[str]:
    return Counter(m.group(1) for m in REFUSAL_LINE.finditer(server.log()))


def test_hostile_inputs_leave_one_line_per_refusal_and_no_traceback(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    server = start_coordinator(
        tmp_path / "logs",
        port,
        tmp_path / "state",
        *("--min-clients", "1", "--round-timeout", "600", "--log-level", "debug"),
    )
    procs.append(server)
    wait_serving(port, server)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        stub.Join(pb.JoinRequest(client_id=CLIENT), timeout=30)
        header, model = pull(stub, CLIENT, wait_seconds=10)
        assert model is not None
        floats = model.manifest.floats().with_dtype("float32")
        good = pb.UpdateChunk(
            header=pb.UpdateHeader(
                client_id=CLIENT,
                round=header.round,
                base_version=header.model_version,
                num_examples=10,
                encoding="fp32",
                manifest=manifest_to_proto(floats),
                total_bytes=floats.total_bytes,
            )
        ).SerializeToString()
        data = pb.UpdateChunk(data=b"\x00" * 1024).SerializeToString()
        trailer = pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256="ab")).SerializeToString()
        # The newer paths: a finite value no trained model has (it overflowed the float32 sum),
        # SCAFFOLD's Δc and adaptive clipping's masked bit sent to a plain FedAvg coordinator.
        huge = np.full(floats.total_bytes // 4, 1e30, dtype="<f4").tobytes()
        huge_stream = [
            good,
            pb.UpdateChunk(data=huge).SerializeToString(),
            pb.UpdateChunk(
                trailer=pb.UpdateTrailer(sha256=hashlib.sha256(huge).hexdigest())
            ).SerializeToString(),
        ]

        def extra_tensors(manifest: Manifest) -> bytes:
            h = pb.UpdateChunk.FromString(good)
            h.header.manifest.CopyFrom(manifest_to_proto(manifest))
            h.header.total_bytes = manifest.total_bytes
            return h.SerializeToString()

        outcomes: Counter[grpc.StatusCode] = Counter()
        for method in SERVICE.methods:
            for request in _hostile_requests(method):
                outcomes[_call(channel, method.name, [request])] += 1  # type: ignore[index]
        for stream in (
            [],
            [data, good],
            [good, good],
            [good, trailer, data],
            [good, data],
            [good, b"\xff\xff"],
            [trailer],
            huge_stream,
            [extra_tensors(exchanged(floats)), data],
            [extra_tensors(with_masked_bit(floats)), data],
        ):
            outcomes[_call(channel, "SubmitUpdate", stream)] += 1  # type: ignore[index]
        refused = sum(n for code, n in outcomes.items() if code in REFUSALS)
        assert refused > 150 and not set(outcomes) - REFUSALS - {grpc.StatusCode.OK}, outcomes
        lines = _refusal_lines(server)
        assert sum(lines.values()) == refused, (lines, outcomes)
        assert lines == Counter({c.name: n for c, n in outcomes.items() if c in REFUSALS})

        # Abandoned uploads: each one is begun by the coordinator (its DEBUG line), then the
        # client cancels it or lets its deadline pass; the coordinator ends it (one line: the
        # lost connection, or the refusal of a truncated stream it could no longer send).
        def stalled_upload(gate: threading.Event) -> Iterator[bytes]:
            yield good
            yield data
            gate.wait(60)

        def ended() -> int:
            log = server.log()
            return log.count("nothing counted") + log.count("ended without a trailer")

        for i in range(4):
            gate, before, begun = threading.Event(), ended(), server.log().count("receiving from")
            future = channel.stream_unary(f"/{SERVICE.full_name}/SubmitUpdate").future(
                stalled_upload(gate), timeout=None if i % 2 else 5
            )
            wait_until(
                lambda begun=begun: server.log().count("receiving from") > begun,
                60,
                "the upload to begin",
            )
            if i % 2:
                future.cancel()
            else:
                assert future.exception(60).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gate.set()
            wait_until(lambda before=before: ended() > before, 60, "the upload to end")
        poll = channel.unary_stream(f"/{SERVICE.full_name}/GetGlobalModel")(
            # Another client, not selected this round: its long-poll waits, then is abandoned.
            pb.GetGlobalModelRequest(client_id="late", wait_seconds=20).SerializeToString(),
            timeout=0.3,
        )
        with pytest.raises(grpc.RpcError):
            list(poll)
        # Still serving, the round intact.
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=30)
        assert status.current_round == header.round and status.updates_received == 0
    assert "Traceback" not in server.log()
