"""Hostile input against live coordinators: one message must never stop the coordinator.

Every count and length a client controls is bounded before any work is done on it
(fedcore/limits.py, docs/protocol.md "Limits"). These tests send the worst cases an outside
audit built (a 450,000-tensor manifest, 270,000 metric keys, megabyte properties and ids, a long
history) and, for every RPC of the service descriptor, the largest messages a generic filler can
build, while a second client's GetStatus must keep answering OK. No timing is asserted: a
blocked event loop shows up as a GetStatus that misses its (generous) deadline.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from fedcore import limits
from fedcore.checksums import new_hasher
from fedcore.codecs import get_codec
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, float_vector
from fedcore.wire import manifest_to_proto, update_stream
from tests.procs import free_port, start_coordinator, wait_serving
from tests.raw_client import Joined, lone_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ATTACKER = "attacker"
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
BUDGET = 7 << 20  # bytes per attack message: under the coordinator's 8 MiB cap
ATTACK_TIMEOUT = 120.0  # per attack call: generous, the assertion is on the status
STATUS_TIMEOUT = 10.0  # per GetStatus while under attack
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
}


@dataclass
class Live:
    joined: Joined
    port: int
    encoding: str

    @property
    def model(self) -> FlatModel:
        return self.joined.model

    @property
    def round(self) -> int:
        return self.joined.header.round


def _live(tmp: Path, *flags: str, encoding: str = "fp32") -> Iterator[Live]:
    with lone_client(tmp, ATTACKER, "--rounds", "2", "--round-timeout", "3600", *flags) as joined:
        yield Live(joined, joined.port, encoding)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    yield from _live(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def secagg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    yield from _live(
        tmp_path_factory.mktemp("hostile-secagg"), "--secure", "secagg", encoding="masked-u64"
    )


@pytest.fixture
def stock(plain: Live) -> Iterator[pb_grpc.CoordinatorStub]:
    """A stock gRPC client: default options (4 MiB receive, 8 KiB metadata), unlike fedclient."""
    with grpc.insecure_channel(f"127.0.0.1:{plain.port}") as channel:
        yield pb_grpc.CoordinatorStub(channel)


def _header(live: Live, **overrides: object) -> pb.UpdateHeader:
    """A valid header for the round the attacker is selected in (its encoding's layout)."""
    codec = get_codec(live.encoding)
    floats = live.model.manifest.floats()
    wire = codec.wire_manifest(floats)
    fields: dict[str, object] = dict(
        client_id=ATTACKER,
        round=live.round,
        base_version=live.model.version,
        num_examples=10,
        encoding=live.encoding,
        manifest=manifest_to_proto(wire),
        total_bytes=wire.total_bytes,
        checksum="blake3",
    )
    fields.update(overrides)
    return pb.UpdateHeader(**fields)  # type: ignore[arg-type]


def _submit(stub: pb_grpc.CoordinatorStub, header: pb.UpdateHeader, payload: bytes = b"") -> Any:
    """SubmitUpdate of `header` (+ payload and a correct trailer); the RpcError if refused."""
    h = new_hasher("blake3")
    h.update(payload)
    try:
        return stub.SubmitUpdate(
            update_stream(header, payload, h.hexdigest()), timeout=ATTACK_TIMEOUT
        )
    except grpc.RpcError as e:
        return e


def _refused(result: Any, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    assert isinstance(result, grpc.RpcError), f"accepted: {result}"
    assert result.code() == code, (result.code(), result.details())
    details = result.details() or ""
    assert len(details.encode()) <= limits.MAX_REFUSAL_MESSAGE, len(details)
    return details


def _status_ok(live: Live) -> pb.GetStatusReply:
    return live.joined.stub.GetStatus(pb.GetStatusRequest(), timeout=STATUS_TIMEOUT)


# ---------------------------------------------------------------- the audit's cases


def test_450000_duplicate_tensor_specs_are_refused(plain: Live) -> None:
    manifest = pb.Manifest()
    manifest.tensors.extend([pb.TensorSpec(name="w", dtype="float32", shape=[])] * 450_000)
    header = _header(plain, manifest=manifest)
    assert header.ByteSize() > 6 << 20
    details = _refused(_submit(plain.joined.stub, header))
    assert "450000 tensors" in details
    assert _status_ok(plain).current_round == plain.round


def test_more_tensors_than_the_model_is_refused(plain: Live) -> None:
    floats = plain.model.manifest.floats().with_dtype("float32")
    extra = len(plain.model.manifest.tensors) + 1 - len(floats.tensors)
    specs = list(manifest_to_proto(floats).tensors)
    specs += [pb.TensorSpec(name=f"extra.{i}", dtype="float32", shape=[1]) for i in range(extra)]
    details = _refused(
        _submit(plain.joined.stub, _header(plain, manifest=pb.Manifest(tensors=specs)))
    )
    assert "at most" in details


def test_get_status_answers_garbage_with_invalid_argument(plain: Live) -> None:
    raw = plain.joined.channel.unary_unary(f"/{SERVICE.full_name}/GetStatus")
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff\xff", timeout=10)
    _refused(e.value)


def test_270000_metric_keys_are_refused_and_status_keeps_working(plain: Live) -> None:
    metrics = {f"m{i}": 1.0 for i in range(270_000)}
    payload = np.zeros(float_vector(plain.model).size, dtype="<f4").tobytes()
    details = _refused(_submit(plain.joined.stub, _header(plain, metrics=metrics), payload))
    assert f"at most {limits.MAX_METRICS}" in details
    evaluation = pb.EvaluationResult(
        client_id=ATTACKER, round=plain.round, model_version=plain.model.version, metrics=metrics
    )
    with pytest.raises(grpc.RpcError) as e:
        plain.joined.stub.SubmitEvaluation(evaluation, timeout=ATTACK_TIMEOUT)
    _refused(e.value)
    status = _status_ok(plain)
    assert status.rejections["bad_metrics"] >= 2
    assert status.ByteSize() < 64 << 10


def test_megabyte_join_properties_are_refused(plain: Live, stock: pb_grpc.CoordinatorStub) -> None:
    for properties in ({"blob": "x" * (1 << 20)}, {f"k{i}": "v" for i in range(300)}):
        with pytest.raises(grpc.RpcError) as e:
            stock.Join(pb.JoinRequest(client_id="prop", properties=properties), timeout=30)
        _refused(e.value)
    stock.Join(pb.JoinRequest(client_id="prop", properties={"hostname": "h"}), timeout=30)


@pytest.mark.parametrize("where", ["client_id", "tensor_name", "encoding", "dtype"])
def test_refusals_quoting_a_mebibyte_stay_short(
    plain: Live, stock: pb_grpc.CoordinatorStub, where: str
) -> None:
    """A stock client must see INVALID_ARGUMENT, not a local RESOURCE_EXHAUSTED (metadata)."""
    huge = "x" * (1 << 20)
    if where == "client_id":
        with pytest.raises(grpc.RpcError) as e:
            stock.Join(pb.JoinRequest(client_id=huge), timeout=30)
        result: Any = e.value
    else:
        spec = {"tensor_name": dict(name=huge), "dtype": dict(dtype=huge)}.get(where, {})
        manifest = pb.Manifest(
            tensors=[pb.TensorSpec(**{"name": "w", "dtype": "float32", "shape": [1], **spec})]
        )
        header = _header(plain, manifest=manifest) if spec else _header(plain, encoding=huge)
        result = _submit(stock, header)
    details = _refused(result)
    assert "x" * (limits.MAX_EXCERPT + 1) not in details


def test_get_status_stays_bounded_with_a_long_history(tmp_path: Path) -> None:
    """500 committed rounds of 128 long metric names: ~5 MB of history, more than a stock
    client accepts; the reply lists the latest rounds only and says how many it left out."""
    state = tmp_path / "state"
    port = free_port()
    server = start_coordinator(tmp_path / "logs", port, state, "--min-clients", "5")
    try:
        wait_serving(port, server)
        metrics = json.dumps({f"{'k' * 60}{i:04d}": float(i) for i in range(128)})
        with sqlite3.connect(state / "state.db") as db:
            width = len(db.execute("SELECT * FROM rounds LIMIT 0").description)
            rows = [(r, "v" * 64, 3, 30, metrics, *([0.0] * (width - 5))) for r in range(1, 501)]
            db.executemany(f"INSERT INTO rounds VALUES ({', '.join('?' * width)})", rows)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)
        assert 0 < len(reply.rounds) <= limits.MAX_STATUS_ROUNDS
        assert reply.ByteSize() <= limits.MAX_STATUS_BYTES + (64 << 10)
        assert reply.rounds[-1].round == 500
        assert [r.round for r in reply.rounds] == list(range(501 - len(reply.rounds), 501))
        assert reply.rounds_omitted == 500 - len(reply.rounds)
    finally:
        server.kill()


# ---------------------------------------------------------------- every RPC, worst case

# Repeated message fields are filled with copies of a valid-looking element, so the attack
# reaches the checks behind the parser (a manifest of one real-looking tensor, repeated).
_ELEMENTS: dict[str, Callable[[], Message]] = {
    "fedgrpc.v1.TensorSpec": lambda: pb.TensorSpec(name="w", dtype="float32", shape=[1]),
}
_SCALAR_BYTES = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES}


def _repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)
    return bool(flag) if flag is not None else f.label == FieldDescriptor.LABEL_REPEATED


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _paths(desc: Descriptor, prefix: tuple[str, ...] = (), depth: int = 0) -> Iterator[tuple]:
    """Every field an attacker can make big: strings, bytes, maps, repeated fields, at any
    depth of singular sub-messages (a header inside a chunk, a manifest inside a header)."""
    for f in desc.fields:
        path = (*prefix, f.name)
        if _is_map(f) or _repeated(f) or f.type in _SCALAR_BYTES:
            yield path
        elif f.message_type is not None and depth < 3:
            yield from _paths(f.message_type, path, depth + 1)


def _entry_value(f: FieldDescriptor) -> object:
    value_field = f.message_type.fields_by_name["value"]
    if value_field.type in _SCALAR_BYTES:
        return "v" if value_field.type == FieldDescriptor.TYPE_STRING else b"v"
    return 1.0 if value_field.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE else 1


def _fill(msg: Message, path: tuple[str, ...], budget: int) -> None:
    """Make the field at `path` about `budget` bytes big (the rest of `msg` stays as is)."""
    for name in path[:-1]:
        msg = getattr(msg, name)
    f = msg.DESCRIPTOR.fields_by_name[path[-1]]
    if _is_map(f):
        target, value = getattr(msg, f.name), _entry_value(f)
        for i in range(budget // 24):  # ~22 bytes per entry on the wire
            target[f"k{i:08d}"] = value  # type: ignore[index]
    elif _repeated(f) and f.message_type is not None:
        make = _ELEMENTS.get(f.message_type.full_name, GetMessageClass(f.message_type))
        element = make()
        if element.ByteSize() == 0:  # e.g. EncryptedShare: give it a one-character id
            _fill(element, (element.DESCRIPTOR.fields[0].name,), 1)
        count = budget // (element.ByteSize() + 3)
        getattr(msg, f.name).extend([element] * count)
    elif _repeated(f):
        one: object = "s" if f.type == FieldDescriptor.TYPE_STRING else 1
        getattr(msg, f.name).extend([one] * (budget // 3))
    elif f.type == FieldDescriptor.TYPE_STRING:
        setattr(msg, f.name, "x" * budget)
    else:
        setattr(msg, f.name, b"\x00" * budget)


def _base(live: Live, desc: Descriptor) -> Message:
    """A plausible request of type `desc` from the attacker (what the filler then inflates)."""
    msg = GetMessageClass(desc)()
    if desc.full_name == "fedgrpc.v1.UpdateChunk":
        msg.header.CopyFrom(_header(live))
        return msg
    if "client_id" in desc.fields_by_name:
        msg.client_id = ATTACKER
    if "round" in desc.fields_by_name:
        msg.round = live.round
    return msg


@dataclass
class Poller:
    """Another client calling GetStatus back to back until stopped."""

    port: int
    results: list[grpc.StatusCode] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            while not self.stop.is_set():
                try:
                    stub.GetStatus(pb.GetStatusRequest(), timeout=STATUS_TIMEOUT)
                    self.results.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    self.results.append(e.code())


def _attacks(live: Live) -> Iterator[tuple[str, str, bytes]]:
    """(rpc, what, serialized request): per RPC, seeded garbage and every field inflated."""
    garbage = np.random.default_rng(12).bytes(BUDGET)
    for method in SERVICE.methods:
        yield method.name, "garbage", garbage
        for path in _paths(method.input_type):
            msg = _base(live, method.input_type)
            _fill(msg, path, BUDGET)
            yield method.name, ".".join(path), msg.SerializeToString()


def _call(channel: grpc.Channel, rpc: str, request: bytes) -> grpc.StatusCode:
    method = SERVICE.methods_by_name[rpc]
    path = f"/{SERVICE.full_name}/{rpc}"
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter([request]), timeout=ATTACK_TIMEOUT)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(request, timeout=ATTACK_TIMEOUT):
                pass
        else:
            channel.unary_unary(path)(request, timeout=ATTACK_TIMEOUT)
    except grpc.RpcError as e:
        assert len((e.details() or "").encode()) <= limits.MAX_REFUSAL_MESSAGE, (rpc, e.code())
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("mode", ["plain", "secagg"])
def test_every_rpc_worst_case_while_get_status_answers(
    mode: str, request: pytest.FixtureRequest
) -> None:
    live: Live = request.getfixturevalue(mode)
    poller = Poller(live.port)
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    outcomes: dict[tuple[str, str], grpc.StatusCode] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{live.port}") as channel:
            for rpc, what, payload in _attacks(live):
                before = len(poller.results)
                outcomes[rpc, what] = _call(channel, rpc, payload)
                # Every attack is followed by at least one more GetStatus answer.
                deadline = time.monotonic() + STATUS_TIMEOUT * 2
                while len(poller.results) == before and time.monotonic() < deadline:
                    poller.stop.wait(0.01)
                assert len(poller.results) > before, f"GetStatus stalled after {rpc} {what}"
                stalled = set(poller.results) - {grpc.StatusCode.OK}
                assert not stalled, f"GetStatus failed during {rpc} {what}: {stalled}"
    finally:
        poller.stop.set()
        thread.join(STATUS_TIMEOUT * 2)
    assert {rpc for rpc, _ in outcomes} == {m.name for m in SERVICE.methods}
    assert set(poller.results) == {grpc.StatusCode.OK}, poller.results
    bad = {k: v for k, v in outcomes.items() if v not in REFUSALS | {grpc.StatusCode.OK}}
    assert not bad, bad
    # Only reads may succeed: nothing an attacker inflated was accepted as a write.
    writes = {"Join", "SubmitUpdate", "SubmitEvaluation", "SubmitDecryption", "AdvertiseKeys"}
    writes |= {"ShareKeys", "Unmask"}
    accepted = {k for k, v in outcomes.items() if v == grpc.StatusCode.OK and k[0] in writes}
    assert not accepted, accepted
    status = _status_ok(live)
    assert status.current_round == live.round
