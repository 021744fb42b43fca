"""Update codecs: encode, then decode a stream cut at arbitrary byte boundaries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.codecs import CODECS, Float32Codec, Piece, StreamDecoder, get_codec
from fedcore.tensors import Manifest, ManifestError, TensorSpec


def _vector(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38], dtype=np.float32)
    values[: min(n, special.size)] = special[: min(n, special.size)]
    return values


def _split(payload: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(payload)]
    return [payload[a:b] for a, b in itertools.pairwise(bounds)]


def _decode(decoder: StreamDecoder, chunks: list[bytes], n: int) -> np.ndarray:
    out = np.full(n, 7.0, dtype=np.float32)
    expected_offset = 0
    for chunk in chunks:
        for piece in decoder.feed(memoryview(chunk)):
            assert isinstance(piece, Piece)
            assert piece.offset == expected_offset
            assert piece.values.dtype == np.float32
            out[piece.offset : piece.offset + piece.values.size] = piece.values
            expected_offset += piece.values.size
    decoder.finish()
    assert expected_offset == n
    return out


def test_fp32_is_registered() -> None:
    codec = get_codec("fp32")
    assert isinstance(codec, Float32Codec)
    assert CODECS["fp32"] is codec


def test_fp32_payload_is_little_endian_float32() -> None:
    payload = get_codec("fp32").encode(np.array([1.0, -2.0], dtype=np.float64))
    assert payload.dtype == np.uint8 and payload.ndim == 1
    assert payload.tobytes() == np.array([1.0, -2.0], dtype="<f4").tobytes()


def test_fp32_wire_manifest_is_float32_of_the_floats_but_half_stays_half() -> None:
    floats = Manifest((TensorSpec("w", "bfloat16", (2, 3)), TensorSpec("b", "float64", ())))
    wire = get_codec("fp32").wire_manifest(floats)
    assert [(t.name, t.dtype, t.shape) for t in wire.tensors] == [
        ("w", "bfloat16", (2, 3)),  # no upcast on the wire (tests/test_native_dtype.py)
        ("b", "float32", ()),
    ]
    assert wire.total_bytes == 6 * 2 + 4


@pytest.mark.parametrize("seed", range(5))
def test_fp32_round_trip_over_random_chunk_boundaries(seed: int) -> None:
    codec = get_codec("fp32")
    vector = _vector(257, seed)
    payload = codec.encode(vector).tobytes()
    rng = np.random.default_rng(seed)
    cuts = rng.integers(0, len(payload) + 1, size=int(rng.integers(0, 40))).tolist()
    decoded = _decode(codec.decoder(vector.size), _split(payload, cuts), vector.size)
    assert decoded.tobytes() == vector.tobytes()


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    n=st.integers(min_value=0, max_value=64),
    cut_fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=12),
)
def test_fp32_round_trip_property(n: int, cut_fractions: list[float]) -> None:
    codec = get_codec("fp32")
    vector = _vector(n, seed=n)
    payload = codec.encode(vector).tobytes()
    cuts = [int(f * len(payload)) for f in cut_fractions]
    decoded = _decode(codec.decoder(n), _split(payload, cuts), n)
    assert decoded.tobytes() == vector.tobytes()


def test_one_byte_chunks_decode() -> None:
    codec = get_codec("fp32")
    vector = _vector(9)
    payload = codec.encode(vector).tobytes()
    chunks = [payload[i : i + 1] for i in range(len(payload))]
    assert _decode(codec.decoder(9), chunks, 9).tobytes() == vector.tobytes()


@pytest.mark.parametrize("missing", [1, 3, 4, 8])
def test_truncated_stream_fails_at_finish(missing: int) -> None:
    codec = get_codec("fp32")
    payload = codec.encode(_vector(10)).tobytes()
    decoder = codec.decoder(10)
    list(decoder.feed(payload[:-missing]))
    with pytest.raises(ManifestError, match=r"ended after \d+ of 10 values \(truncated\)"):
        decoder.finish()


def test_empty_stream_fails_at_finish() -> None:
    decoder = get_codec("fp32").decoder(2)
    with pytest.raises(ManifestError, match="truncated"):
        decoder.finish()


def test_zero_values_need_zero_bytes() -> None:
    decoder = get_codec("fp32").decoder(0)
    assert list(decoder.feed(b"")) == []
    decoder.finish()


def test_too_many_values_in_one_chunk() -> None:
    decoder = get_codec("fp32").decoder(3)
    with pytest.raises(ManifestError, match="more than the 3 values"):
        list(decoder.feed(np.zeros(4, dtype="<f4").tobytes()))


def test_too_many_values_across_chunks() -> None:
    decoder = get_codec("fp32").decoder(3)
    payload = np.zeros(4, dtype="<f4").tobytes()
    assert sum(p.values.size for p in decoder.feed(payload[:10])) == 2
    with pytest.raises(ManifestError, match="more than the 3 values"):
        list(decoder.feed(payload[10:]))


def test_trailing_partial_value_fails_at_finish() -> None:
    decoder = get_codec("fp32").decoder(2)
    list(decoder.feed(np.zeros(2, dtype="<f4").tobytes() + b"\x00"))
    with pytest.raises(ManifestError, match="truncated"):
        decoder.finish()


def test_unknown_codec_lists_supported_ones() -> None:
    with pytest.raises(ManifestError, match=r"unknown update encoding 'nope'; supported: fp32"):
        get_codec("nope")
