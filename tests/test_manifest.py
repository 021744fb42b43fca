"""Manifests and tensor specs: dtypes, shapes, names, offsets, and numpy arrays flattened."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.tensors import (
    FlatModel,
    Manifest,
    ManifestError,
    TensorSpec,
    flatten_arrays,
)


def test_flatten_arrays_round_trips_every_numpy_dtype() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "f64": rng.standard_normal((2, 3)),
        "f32": rng.standard_normal(4).astype(np.float32),
        "f16": rng.standard_normal(3).astype(np.float16),
        "i64": rng.integers(-(2**62), 2**62, 3),
        "i32": rng.integers(-5, 5, (2, 2)).astype(np.int32),
        "i16": np.array([-1, 2], dtype=np.int16),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u8": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([True, False]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 2), dtype=np.float32),
        "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,
    }
    flat = flatten_arrays(arrays)
    assert [t.name for t in flat.manifest.tensors] == list(arrays)
    for name, arr in arrays.items():
        raw = flat.raw(name)
        assert raw.dtype == arr.dtype and raw.shape == arr.shape, name
        assert raw.tobytes() == np.ascontiguousarray(arr).tobytes(), name


@pytest.mark.parametrize("dtype", [np.complex64, np.uint16, np.uint32, np.complex128])
def test_flatten_arrays_rejects_unsupported_dtypes(dtype: type) -> None:
    with pytest.raises(ManifestError, match="unsupported dtype"):
        flatten_arrays({"x": np.zeros(2, dtype=dtype)})


def test_manifest_rejects_duplicate_names() -> None:
    spec = TensorSpec("w", "float32", (2,))
    with pytest.raises(ManifestError, match=r"duplicate tensor names.*'w'"):
        Manifest((spec, TensorSpec("b", "int8", ()), spec))


def test_tensor_spec_rejects_unknown_dtype_and_lists_supported() -> None:
    with pytest.raises(ManifestError, match=r"unsupported dtype 'complex64'.*float32.*bool"):
        TensorSpec("w", "complex64", (2,))


@pytest.mark.parametrize("shape", [(-1,), (2, -3)])
def test_tensor_spec_rejects_negative_dims(shape: tuple[int, ...]) -> None:
    with pytest.raises(ManifestError, match="negative dimension"):
        TensorSpec("w", "float32", shape)


def test_tensor_spec_rejects_empty_name() -> None:
    with pytest.raises(ManifestError, match="name"):
        TensorSpec("", "float32", (1,))


def test_manifest_offsets_and_sizes() -> None:
    manifest = Manifest(
        (
            TensorSpec("a", "float32", (2, 3)),
            TensorSpec("b", "int8", ()),
            TensorSpec("c", "bfloat16", (0, 4)),
            TensorSpec("d", "float64", (1,)),
        )
    )
    assert manifest.offsets == {"a": (0, 24), "b": (24, 1), "c": (25, 0), "d": (25, 8)}
    assert manifest.total_bytes == 33
    assert [t.name for t in manifest.floats().tensors] == ["a", "c", "d"]
    assert {t.dtype for t in manifest.with_dtype("float32").tensors} == {"float32"}
    with pytest.raises(KeyError):
        manifest.spec("missing")


def test_flat_model_rejects_wrong_buffers() -> None:
    manifest = Manifest((TensorSpec("w", "float32", (2,)),))
    with pytest.raises(ManifestError, match="holds 7 bytes"):
        FlatModel(manifest, np.zeros(7, dtype=np.uint8))
    with pytest.raises(ManifestError, match="1-D uint8"):
        FlatModel(manifest, np.zeros(2, dtype=np.float32))


@pytest.mark.timeout(60)
def test_duplicate_check_is_linear_in_the_manifest() -> None:
    """450,000 copies of one name (the audit's header) are refused at once, not in O(n^2)."""
    spec = TensorSpec("w", "float32", ())
    with pytest.raises(ManifestError, match=r"duplicate tensor names in manifest \(1\): \['w'\]"):
        Manifest((spec,) * 450_000)
    many = Manifest(tuple(TensorSpec(f"t{i}", "float32", (1,)) for i in range(50_000)))
    assert many.spec("t49999").name == "t49999"
