"""FlatModel: bit-exact conversions, content versions, chunked transfer, float vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.tensors import (
    ChunkAssembler,
    FlatModel,
    Manifest,
    ManifestError,
    TensorSpec,
    flatten_arrays,
    flatten_state_dict,
    float32_to_bfloat16_bits,
    float_vector,
    iter_chunks,
    to_state_dict,
    with_float_vector,
)
from tests.state_checks import assert_same_state

CHUNK_SIZES = [1, 3, 7, 1 << 20]


def _sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, 3.0e38])
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f32_special": special,
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "f16_special": special.to(torch.float16),
        "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "bf16_special": special.to(torch.bfloat16),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.randint(-(2**62), 2**62, (4,), generator=g, dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 128, (7,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (3, 3), generator=g, dtype=torch.uint8),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar_f32": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "scalar_bf16": torch.tensor(0.1, dtype=torch.bfloat16),
        "scalar_bool": torch.tensor(True),
        "empty_u8": torch.empty(0, 3, dtype=torch.uint8),
        "empty_bool": torch.empty(0, dtype=torch.bool),
        "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
    }


def _empty_state() -> dict[str, torch.Tensor]:
    return {
        "empty_f32": torch.empty(0, 3),
        "empty_bf16": torch.empty(0, dtype=torch.bfloat16),
        "empty_i64": torch.empty(2, 0, dtype=torch.int64),
    }


def _flat_u8(data: bytes) -> FlatModel:
    manifest = Manifest((TensorSpec("b", "uint8", (len(data),)),))
    return FlatModel(manifest, np.frombuffer(data, dtype=np.uint8).copy())


# ---------------------------------------------------------------- state_dict round trip


def test_state_dict_round_trip_is_bit_exact_for_every_dtype() -> None:
    state = _sample_state()
    flat = flatten_state_dict(state)
    assert [t.name for t in flat.manifest.tensors] == list(state)
    assert flat.manifest.spec("scalar_f32").shape == ()
    assert flat.manifest.spec("empty_u8").shape == (0, 3)
    assert flat.manifest.spec("mask").dtype == "bool"
    assert_same_state(to_state_dict(flat), state)


def test_empty_tensors_flatten_with_zero_bytes() -> None:
    flat = flatten_state_dict(_empty_state())
    assert flat.buffer.size == 0
    assert flat.manifest.spec("empty_i64").shape == (2, 0)
    assert [t.dtype for t in flat.manifest.tensors] == ["float32", "bfloat16", "int64"]


def test_empty_tensors_round_trip() -> None:
    assert_same_state(to_state_dict(flatten_state_dict(_empty_state())), _empty_state())


_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]
_SHAPES = [(), (0,), (3, 0), (1,), (4, 5)]
_SINGLE_CASES = [
    pytest.param(
        dtype,
        shape,
        id=f"{str(dtype).removeprefix('torch.')}-{shape}",
    )
    for dtype in _DTYPES
    for shape in _SHAPES
]


@pytest.mark.parametrize(("dtype", "shape"), _SINGLE_CASES)
def test_single_tensor_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 256, (int(np.prod(shape, dtype=np.int64)) * 8,), generator=g)
    if dtype is torch.bool:
        tensor = (bits[: int(np.prod(shape, dtype=np.int64))] % 2).to(torch.bool).reshape(shape)
    else:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        tensor = bits[:n].to(torch.uint8).view(dtype).reshape(shape)
    flat = flatten_state_dict({"t": tensor})
    assert flat.buffer.size == tensor.numel() * tensor.element_size()
    assert_same_state(to_state_dict(flat), {"t": tensor})


def test_to_state_dict_returns_independent_copies() -> None:
    flat = flatten_state_dict({"w": torch.zeros(3)})
    before = flat.buffer.tobytes()
    out = to_state_dict(flat)
    out["w"].add_(1.0)
    assert flat.buffer.tobytes() == before


def test_flatten_state_dict_rejects_unsupported_dtype() -> None:
    with pytest.raises(ManifestError, match="unsupported dtype 'complex64'"):
        flatten_state_dict({"c": torch.zeros(2, dtype=torch.complex64)})


# ---------------------------------------------------------------- versions


def test_version_is_deterministic_and_content_addressed() -> None:
    a = flatten_state_dict(_sample_state())
    b = flatten_state_dict(_sample_state())
    assert a.version == b.version
    assert len(a.version) == 64


def test_version_changes_when_one_byte_changes() -> None:
    base = flatten_arrays({"w": np.arange(8, dtype=np.float32)})
    for index in (0, 13, base.buffer.size - 1):
        changed = base.copy()
        changed.buffer[index] ^= 1
        assert changed.version != base.version, index


def test_version_changes_with_name_dtype_or_shape() -> None:
    values = np.arange(4, dtype=np.float32)
    base = flatten_arrays({"w": values})
    renamed = flatten_arrays({"v": values})
    retyped = FlatModel(base.manifest.with_dtype("int32"), base.buffer.copy())
    reshaped = flatten_arrays({"w": values.reshape(2, 2)})
    assert base.buffer.tobytes() == renamed.buffer.tobytes() == reshaped.buffer.tobytes()
    versions = {base.version, renamed.version, retyped.version, reshaped.version}
    assert len(versions) == 4


def test_version_distinguishes_manifests_with_ambiguous_descriptions() -> None:
    two = Manifest((TensorSpec("a", "float32", (0,)), TensorSpec("b", "float32", (1,))))
    one = Manifest((TensorSpec("a:float32[0], b", "float32", (1,)),))
    assert two != one
    assert FlatModel.zeros(two).version != FlatModel.zeros(one).version


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunks_reassemble_exactly(chunk_size: int) -> None:
    flat = flatten_state_dict(_sample_state())
    chunks = list(flat.chunks(chunk_size))
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk_size
    assembler = ChunkAssembler(flat.manifest)
    for chunk in chunks:
        assembler.add(chunk)
    out = assembler.finish(flat.version)
    assert out.buffer.tobytes() == flat.buffer.tobytes()
    assert out.version == flat.version
    assert_same_state(to_state_dict(out), _sample_state())


@settings(max_examples=50, deadline=None, derandomize=True)
@given(data=st.binary(max_size=300), chunk_size=st.integers(min_value=1, max_value=400))
def test_any_chunk_size_reassembles_exactly(data: bytes, chunk_size: int) -> None:
    flat = _flat_u8(data)
    chunks = list(iter_chunks(flat.buffer, chunk_size))
    assert b"".join(bytes(c) for c in chunks) == data
    assert len(chunks) == -(-len(data) // chunk_size)
    assembler = ChunkAssembler(flat.manifest)
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.finish(flat.version).buffer.tobytes() == data


def test_iter_chunks_accepts_bytes_and_rejects_nonpositive_size() -> None:
    assert [bytes(c) for c in iter_chunks(b"abcdefg", 3)] == [b"abc", b"def", b"g"]
    assert list(iter_chunks(b"", 3)) == []
    with pytest.raises(ValueError, match="positive"):
        list(iter_chunks(b"abc", 0))


def test_empty_model_assembles_without_chunks() -> None:
    flat = flatten_state_dict({"e": torch.empty(0)})
    assembler = ChunkAssembler(flat.manifest)
    assembler.add(b"")
    assert assembler.finish(flat.version).buffer.size == 0


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_truncated_stream_is_rejected(chunk_size: int) -> None:
    flat = flatten_state_dict(_sample_state())
    assembler = ChunkAssembler(flat.manifest)
    for chunk in iter_chunks(flat.buffer[:-1], chunk_size):
        assembler.add(chunk)
    with pytest.raises(ManifestError, match="truncated"):
        assembler.finish(flat.version)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_extra_bytes_are_rejected(chunk_size: int) -> None:
    flat = flatten_state_dict(_sample_state())
    assembler = ChunkAssembler(flat.manifest)
    stream = flat.buffer.tobytes() + b"\x00"
    with pytest.raises(ManifestError, match="more than"):
        for chunk in iter_chunks(stream, chunk_size):
            assembler.add(chunk)


@pytest.mark.parametrize("checked_by", ["version", "checksum"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_corrupted_byte_is_rejected(chunk_size: int, checked_by: str) -> None:
    flat = flatten_state_dict(_sample_state())
    corrupted = flat.buffer.copy()
    corrupted[corrupted.size // 2] ^= 0x10
    assembler = ChunkAssembler(flat.manifest, flat.checksum if checked_by == "checksum" else "")
    for chunk in iter_chunks(corrupted, chunk_size):
        assembler.add(chunk)
    with pytest.raises(ManifestError, match="corrupted"):
        assembler.finish(flat.version)


def test_a_known_checksum_checks_the_bytes_and_names_them_by_the_announced_version() -> None:
    flat = flatten_state_dict(_sample_state())
    assert flat.checksum == "xxh3_128:" + xxhash.xxh3_128(flat.buffer.tobytes()).hexdigest()
    assembler = ChunkAssembler(flat.manifest, flat.checksum)
    for chunk in flat.chunks(7):
        assembler.add(chunk)
    # Not rehashed by the version recipe: the version is the one the header announced.
    out = assembler.finish("announced")
    assert out.buffer.tobytes() == flat.buffer.tobytes() and out.version == "announced"
    # Without one announced, the version is computed when asked.
    assembler = ChunkAssembler(flat.manifest, flat.checksum)
    assembler.add(flat.buffer)
    assert assembler.finish().version == flat.version


def test_a_recycled_buffer_is_filled_in_place_and_must_fit() -> None:
    flat = flatten_state_dict(_sample_state())
    spare = np.full(flat.manifest.total_bytes, 0xAB, dtype=np.uint8)
    assembler = ChunkAssembler(flat.manifest, flat.checksum, spare)
    for chunk in flat.chunks(7):
        assembler.add(chunk)
    out = assembler.finish(flat.version)
    assert out.buffer is spare and spare.tobytes() == flat.buffer.tobytes()
    for wrong in (np.empty(spare.size + 1, np.uint8), np.empty(spare.size // 4, np.float32)):
        with pytest.raises(ValueError, match="recycled buffer must be"):
            ChunkAssembler(flat.manifest, flat.checksum, wrong)


@pytest.mark.parametrize("checksum", ["", "crc99:00ff", "no-colon"])
def test_an_unknown_or_missing_checksum_falls_back_to_the_version(checksum: str) -> None:
    flat = flatten_state_dict(_sample_state())
    assembler = ChunkAssembler(flat.manifest, checksum)
    assembler.add(flat.buffer)
    with pytest.raises(ManifestError, match="announced version"):
        assembler.finish("0" * 64)
    assembler = ChunkAssembler(flat.manifest, checksum)
    assembler.add(flat.buffer)
    assert assembler.finish(flat.version).version == flat.version


def test_finish_without_expected_version_skips_the_check() -> None:
    flat = _flat_u8(b"abc")
    assembler = ChunkAssembler(flat.manifest)
    assembler.add(b"abd")
    assert assembler.finish().buffer.tobytes() == b"abd"


# ---------------------------------------------------------------- float vectors


def _mixed_model() -> FlatModel:
    return flatten_state_dict(
        {
            "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
            "steps": torch.tensor([7, -3], dtype=torch.int64),
            "h": torch.tensor([0.5, -1.25], dtype=torch.float16),
            "mask": torch.tensor([True, False, True]),
            "b": torch.tensor([1.5], dtype=torch.bfloat16),
            "d": torch.tensor(0.75, dtype=torch.float64),
            "counts": torch.tensor([200], dtype=torch.uint8),
        }
    )


def test_float_vector_takes_floats_in_manifest_order() -> None:
    vector = float_vector(_mixed_model())
    assert vector.dtype == np.float32
    assert vector.tolist() == [1.0, 2.0, 3.0, 4.0, 0.5, -1.25, 1.5, 0.75]


def test_with_float_vector_round_trips_and_skips_int_and_bool() -> None:
    flat = _mixed_model()
    assert with_float_vector(flat, float_vector(flat)).version == flat.version

    replaced = with_float_vector(flat, np.arange(8, dtype=np.float32) * 2)
    assert float_vector(replaced).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    for name in ("steps", "mask", "counts"):
        assert replaced.raw(name).tobytes() == flat.raw(name).tobytes()
    assert replaced.manifest == flat.manifest
    assert flat.version == _mixed_model().version  # the input is not modified


def test_with_float_vector_rounds_to_each_dtype() -> None:
    flat = _mixed_model()
    vector = float_vector(flat)
    vector[4] = 0.1  # float16
    vector[6] = 0.1  # bfloat16
    out = to_state_dict(with_float_vector(flat, vector))
    assert out["h"][0].item() == float(np.float16(0.1))
    assert out["b"][0].item() == torch.tensor(0.1).to(torch.bfloat16).item()


def test_with_float_vector_rejects_a_long_vector() -> None:
    with pytest.raises(ManifestError, match="9 values"):
        with_float_vector(_mixed_model(), np.zeros(9, dtype=np.float32))


def test_with_float_vector_rejects_a_short_vector() -> None:
    with pytest.raises(ManifestError, match="7 values"):
        with_float_vector(_mixed_model(), np.zeros(7, dtype=np.float32))


# ---------------------------------------------------------------- bfloat16 rounding


def _torch_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_bfloat16_bits_match_torch_on_random_values() -> None:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4096)
    patterns = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([normal.astype(np.float32), patterns[~np.isnan(patterns)]])
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), _torch_bf16_bits(values))


def test_bfloat16_bits_match_torch_on_ties_and_specials() -> None:
    upper = np.arange(0, 0x7F80, 97, dtype=np.uint32)
    lower = np.array([0x7FFF, 0x8000, 0x8001], dtype=np.uint32)  # below, exactly at, above a tie
    ties = ((upper[:, None] << 16) | lower[None, :]).reshape(-1)
    ties = np.concatenate([ties, ties | np.uint32(0x8000_0000)]).view(np.float32)
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38],
        dtype=np.float32,
    )
    values = np.concatenate([ties, specials])
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), _torch_bf16_bits(values))
    bits = float32_to_bfloat16_bits(specials)
    assert bits[:4].tolist() == [0x0000, 0x8000, 0x7F80, 0xFF80]
    assert bits[7] == 0x7F80  # float32 max rounds up to +inf, as in torch


def test_bfloat16_bits_keep_nan_a_nan() -> None:
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], dtype=np.uint32)
    bits = float32_to_bfloat16_bits(nans.view(np.float32))
    assert all(b & 0x7F80 == 0x7F80 and b & 0x007F for b in bits.tolist())


def test_to_state_dict_views_share_the_buffer() -> None:
    flat = flatten_arrays({"w": np.arange(4, dtype=np.float32)})
    view = to_state_dict(flat, copy=False)["w"]
    assert np.shares_memory(view.numpy(), flat.buffer)
    assert not np.shares_memory(to_state_dict(flat)["w"].numpy(), flat.buffer)


def test_a_large_model_hashed_on_every_core_has_the_version_its_chunks_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The coordinator hashes big models on all cores; clients hash chunk by chunk as they
    stream (ChunkAssembler): the versions must agree."""
    from fedcore import tensors

    monkeypatch.setattr(tensors, "PARALLEL_HASH_BYTES", 1024)
    flat = flatten_arrays({"w": np.arange(300_000, dtype=np.float32)})
    assembler = ChunkAssembler(flat.manifest)
    for chunk in iter_chunks(flat.buffer, 4099):
        assembler.add(chunk)
    assert assembler.finish(flat.version).version == flat.version


def test_an_assembled_model_knows_its_version_without_hashing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client hashes the model as it streams; comparing its version afterwards must not
    hash the whole model a second time."""
    from fedcore import tensors

    flat = flatten_arrays({"w": np.arange(1000, dtype=np.float32)})
    expected = flat.version
    assembler = ChunkAssembler(flat.manifest)
    for chunk in iter_chunks(flat.buffer, 777):
        assembler.add(chunk)
    monkeypatch.setattr(tensors, "content_hash", lambda *a: pytest.fail("hashed twice"))
    assert assembler.finish(expected).version == expected
