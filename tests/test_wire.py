"""Hand-built chunk framing agrees byte for byte with protobuf's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore import limits
from fedcore.limits import clip_message, excerpt
from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import (
    FlatModel,
    Manifest,
    ManifestError,
    TensorSpec,
    float_vector,
    iter_chunks,
    with_float_vector,
)
from fedcore.wire import (
    check_manifest_bounds,
    data_message,
    data_view,
    manifest_from_proto,
    parse_model_chunk,
    parse_update_chunk,
    serialize_message,
)
from fedserver.strategies.base import add_to_floats


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, (1 << 20) + 3])
def test_data_messages_match_protobuf(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = data_message(payload)
    assert raw == pb.UpdateChunk(data=payload).SerializeToString()
    assert raw == pb.ModelChunk(data=payload).SerializeToString()
    view = parse_update_chunk(raw)
    assert isinstance(view, memoryview) and view == payload
    assert pb.ModelChunk.FromString(raw).data == payload


@given(st.binary(max_size=3000), st.integers(1, 700))
@settings(max_examples=50, deadline=None)
def test_framed_chunks_reassemble(buffer: bytes, chunk: int) -> None:
    messages = [data_message(c) for c in iter_chunks(buffer, chunk)]
    assert b"".join(pb.ModelChunk.FromString(m).data for m in messages) == buffer


def test_other_messages_take_the_protobuf_path() -> None:
    header = pb.UpdateChunk(header=pb.UpdateHeader(client_id="c", round=3))
    parsed = parse_update_chunk(header.SerializeToString())
    assert isinstance(parsed, pb.UpdateChunk) and parsed.header.client_id == "c"
    trailer = pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256="ab"))
    assert parse_update_chunk(trailer.SerializeToString()) == trailer
    model_header = pb.ModelChunk(header=pb.ModelHeader(round=2))
    assert parse_model_chunk(model_header.SerializeToString()) == model_header
    assert serialize_message(model_header) == model_header.SerializeToString()
    # A data field followed by anything else is not a bare chunk: protobuf decides.
    assert data_view(data_message(b"xy") + data_message(b"z")) is None
    assert data_view(b"") is None and data_view(b"\x12\x05ab") is None


def test_add_to_floats_equals_whole_vector_arithmetic() -> None:
    manifest = Manifest(
        (
            TensorSpec("w", "float32", (3, 4)),
            TensorSpec("steps", "int64", ()),
            TensorSpec("h", "float16", (5,)),
            TensorSpec("b", "bfloat16", (2,)),
            TensorSpec("s", "float32", ()),
        )
    )
    rng = np.random.default_rng(0)
    model = FlatModel(manifest, rng.integers(0, 64, manifest.total_bytes, dtype=np.uint8))
    model.raw("h")[...] = rng.standard_normal(5).astype(np.float16)
    model.raw("w")[...] = rng.standard_normal((3, 4)).astype(np.float32)
    model.raw("s")[...] = 1.5
    model.raw("b")[...] = 0x3F80
    delta = rng.standard_normal(12 + 5 + 2 + 1).astype(np.float32)
    expected = with_float_vector(model, float_vector(model) + delta)
    got = add_to_floats(model, delta)
    assert bytes(got.buffer) == bytes(expected.buffer)
    assert got.raw("steps") == model.raw("steps")


def test_untrusted_manifests_are_bounded_before_conversion() -> None:
    spec = pb.TensorSpec(name="w", dtype="float32", shape=[1])
    with pytest.raises(ManifestError, match=r"lists 3 tensors; .* at most 2"):
        manifest_from_proto(pb.Manifest(tensors=[spec] * 3), max_tensors=2)
    long_name = pb.TensorSpec(name="n" * (limits.MAX_TENSOR_NAME + 1), dtype="float32")
    with pytest.raises(ManifestError, match="at most 1024 characters") as e:
        check_manifest_bounds(pb.Manifest(tensors=[long_name]), 5)
    assert len(str(e.value)) < 300
    deep = pb.TensorSpec(name="w", dtype="float32", shape=[1] * (limits.MAX_TENSOR_DIMS + 1))
    with pytest.raises(ManifestError, match="33 dimensions"):
        check_manifest_bounds(pb.Manifest(tensors=[deep]), 5)


def test_messages_and_excerpts_are_clipped_on_character_boundaries() -> None:
    assert clip_message("short") == "short"
    clipped = clip_message("é" * 5000, 1024)  # 2 bytes each: the cut must not split one
    assert len(clipped.encode()) <= 1024 and clipped.endswith("(truncated)")
    assert excerpt("ab") == "'ab'"
    assert excerpt("x" * 10_000).endswith("... (10000 characters)")
    assert len(excerpt("x" * 10_000)) < 100
