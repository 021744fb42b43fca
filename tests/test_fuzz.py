"""Property-based fuzzing of SubmitUpdate against ONE live coordinator process.

Hypothesis (derandomized, >= 1000 cases) builds update streams from a valid one and breaks them
in 1-3 ways at once: header fields (client id, round, base version, num_examples, metrics,
encoding, manifest, declared size) and stream shape (chunk cuts, NaN/Inf, truncation, extra
bytes, bad checksum, missing trailer, messages out of order, empty messages). Every case must
be refused with a specific status (never OK, UNKNOWN or INTERNAL), counted under a reason,
leave the daemon serving with the round open, and leave model.safetensors byte-identical. A
valid update sent afterwards yields exactly old + delta, so nothing leaked into the average.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, float_vector
from fedcore.wire import manifest_to_proto, update_stream
from tests.raw_client import lone_client, pull, update_header

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CLIENT = "fuzzer"
CASES = 1000
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
DEFECTS = (
    "bad_client_id",
    "stranger",
    "round",
    "base_version",
    "num_examples",
    "metrics",
    "encoding",
    "manifest",
    "total_bytes",
    "payload",
    "checksum",
    "no_trailer",
    "after_trailer",
    "second_header",
    "empty_message",
    "not_header_first",
    "corrupt_bytes",
)


@dataclass
class Live:
    stub: pb_grpc.CoordinatorStub
    submit_raw: grpc.StreamUnaryMultiCallable  # SubmitUpdate taking serialized messages
    state: Path
    round: int
    model: FlatModel


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with lone_client(tmp, CLIENT, "--rounds", "2", "--round-timeout", "3600") as joined:
        raw = joined.channel.stream_unary(
            "/fedgrpc.v1.Coordinator/SubmitUpdate",
            request_serializer=bytes,
            response_deserializer=pb.SubmitReply.FromString,
        )
        yield Live(joined.stub, raw, tmp / "state", joined.header.round, joined.model)


@st.composite
def _manifest(draw: st.DrawFn, good: list[tuple[str, str, list[int]]]) -> pb.Manifest:
    tensors = [list(t) for t in good]
    how = draw(st.sampled_from(["drop", "rename", "dtype", "shape", "dup", "swap", "add"]))
    i = draw(st.integers(0, len(tensors) - 1))
    if how == "drop":
        tensors.pop(i)
    elif how == "rename":
        tensors[i][0] = draw(st.text(max_size=40))
    elif how == "dtype":
        dtypes = ["float16", "float64", "int8", "bool", "complex64", "", "float32 "]
        tensors[i][1] = draw(st.sampled_from(dtypes) | st.text(max_size=10))
    elif how == "shape":
        tensors[i][2] = draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5))
    elif how == "dup":
        tensors.insert(i, list(tensors[i]))
    elif how == "swap":
        j = draw(st.integers(0, len(tensors) - 1))
        tensors[i], tensors[j] = tensors[j], tensors[i]
    else:
        tensors.append(
            [draw(st.text(max_size=20)), "float32", draw(st.lists(st.integers(0, 64), max_size=3))]
        )
    manifest = pb.Manifest(tensors=[pb.TensorSpec(name=n, dtype=d, shape=s) for n, d, s in tensors])
    return manifest


@st.composite
def _case(draw: st.DrawFn, live: Live) -> tuple[list[str], list[bytes]]:
    """A stream with 1-3 defects, each of which alone must get it refused."""
    defects = sorted(draw(st.sets(st.sampled_from(DEFECTS), min_size=1, max_size=3)))
    floats = live.model.manifest.floats()
    n = sum(t.numel for t in floats.tensors)
    payload = np.linspace(-1e-3, 1e-3, n, dtype="<f4").tobytes()
    good = manifest_to_proto(floats.with_dtype("float32"))
    size = len(payload)
    fields: dict[str, object] = {}  # the header's defects, over a valid update_header()
    text = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)
    if "bad_client_id" in defects:
        fields["client_id"] = draw(
            st.just("")
            | st.text(min_size=129, max_size=300).filter(str.isprintable)
            | text.map(lambda s: s + "\x00")
        )
    if "stranger" in defects:
        fields["client_id"] = draw(
            st.text(min_size=1, max_size=128).filter(lambda s: s.isprintable() and s != CLIENT)
        )
    if "round" in defects:
        fields["round"] = draw(st.integers(0, 2**64 - 1).filter(lambda r: r != live.round))
    if "base_version" in defects:
        fields["base_version"] = draw(text.filter(lambda v: v != live.model.version))
    if "num_examples" in defects:
        fields["num_examples"] = draw(st.just(0) | st.integers(10**9 + 1, 2**64 - 1))
    if "metrics" in defects:
        metrics = draw(st.dictionaries(st.text(max_size=10), st.floats(), max_size=4))
        metrics[draw(st.text(max_size=10))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        fields["metrics"] = metrics
    if "encoding" in defects:
        fields["encoding"] = draw(text.filter(lambda e: e not in ("", "fp32")))
    if "manifest" in defects:
        spec = [(t.name, t.dtype, list(t.shape)) for t in good.tensors]
        fields["manifest"] = draw(_manifest(spec).filter(lambda m: m != good))
    if "total_bytes" in defects:
        fields["total_bytes"] = draw(st.integers(0, 2**64 - 1).filter(lambda b: b != len(payload)))
    if "payload" in defects:  # exactly one payload defect, so they cannot cancel out
        how = draw(st.sampled_from(["non_finite", "truncate", "extra"]))
        if how == "non_finite":
            values = np.frombuffer(payload, dtype="<f4").copy()
            values[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            payload = values.tobytes()
        elif how == "truncate":
            start = draw(st.integers(0, len(payload) - 1))
            end = draw(st.integers(start + 1, len(payload)))
            payload = payload[:start] + payload[end:]
        else:
            payload += draw(st.binary(min_size=1, max_size=64))
    digest = hashlib.sha256(payload).hexdigest()
    if "checksum" in defects:
        digest = draw(text.filter(lambda d: d.lower() != hashlib.sha256(payload).hexdigest()))

    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    bounds = [0, *cuts, len(payload)]
    header = pb.UpdateChunk(header=update_header(CLIENT, live.round, live.model, size, **fields))
    body = [pb.UpdateChunk(data=payload[a:b]) for a, b in itertools.pairwise(bounds)]
    if "second_header" in defects:
        body.insert(draw(st.integers(0, len(body))), header)
    if "empty_message" in defects:
        body.insert(draw(st.integers(0, len(body))), pb.UpdateChunk())
    msgs = [header, *body]
    if "no_trailer" not in defects:
        msgs.append(pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest)))
    if "after_trailer" in defects:
        if "no_trailer" in defects:  # the trailer cannot be both missing and followed
            msgs.append(pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest)))
        msgs.append(draw(st.sampled_from([header, body[0], msgs[-1], pb.UpdateChunk()])))
    if "not_header_first" in defects:
        first = draw(st.sampled_from(["data", "trailer", "empty", "none"]))
        if first == "none":
            msgs = []
        else:
            msgs.insert(0, {"data": body[0], "trailer": msgs[-1], "empty": pb.UpdateChunk()}[first])
    wire = [m.SerializeToString() for m in msgs]
    if "corrupt_bytes" in defects and wire:  # bytes that are not (this) protobuf at all
        i = draw(st.integers(0, len(wire) - 1))
        cut = wire[i][: draw(st.integers(1, max(1, len(wire[i]) - 1)))]
        wire[i] = draw(st.sampled_from([b"\xff\xff\xff", cut]) | st.binary(min_size=1, max_size=64))
    return defects, wire


def _status(live: Live) -> pb.GetStatusReply:
    return live.stub.GetStatus(pb.GetStatusRequest(), timeout=10)


def test_fuzzed_updates_are_all_refused_and_change_nothing(live: Live) -> None:
    model_file = (live.state / "model.safetensors").read_bytes()
    counted_before = sum(_status(live).rejections.values())
    codes: Counter[str] = Counter()
    seen: Counter[str] = Counter()

    @settings(
        max_examples=CASES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_case(live))
    def one(case: tuple[list[str], list[bytes]]) -> None:
        defects, wire = case
        with pytest.raises(grpc.RpcError) as info:
            live.submit_raw(iter(wire), timeout=30)
        code = info.value.code()  # type: ignore[attr-defined]
        assert code in REFUSALS, (defects, code, info.value.details())  # type: ignore[attr-defined]
        assert info.value.details()  # type: ignore[attr-defined]
        codes[code.name] += 1
        seen.update(defects)
        status = _status(live)  # still serving, same round, nothing received
        assert status.state == pb.TRAINING
        assert status.current_round == live.round and status.updates_received == 0
        assert (live.state / "model.safetensors").read_bytes() == model_file

    one()
    cases = sum(codes.values())
    status = _status(live)
    print(f"\nfuzz: {cases} cases run, {cases} refused: {dict(codes)}")
    print(f"fuzz: refusals by reason: {dict(status.rejections)}")
    assert cases >= CASES
    assert seen.keys() == set(DEFECTS)
    # Every refusal was counted under a reason (the counters operators see in GetStatus).
    assert sum(status.rejections.values()) - counted_before == cases


def test_valid_update_after_fuzzing_is_exact(live: Live) -> None:
    n = float_vector(live.model).size
    payload = np.full(n, 0.25, dtype="<f4").tobytes()
    header = update_header(CLIENT, live.round, live.model, len(payload))
    digest = hashlib.sha256(payload).hexdigest()
    reply = live.stub.SubmitUpdate(update_stream(header, payload, digest), timeout=30)
    assert reply.accepted and not reply.duplicate
    header_next, new_model = pull(live.stub, CLIENT)
    assert header_next.round == live.round + 1 and new_model is not None
    expected = float_vector(live.model) + np.float32(0.25)
    assert float_vector(new_model).tobytes() == expected.tobytes()
