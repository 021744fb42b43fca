"""Tensors as a manifest plus raw little-endian bytes: the only way tensors travel or rest.

A model is a `FlatModel`: a `Manifest` (name, dtype, shape per tensor, in a fixed order) and one
contiguous byte buffer holding the tensors back to back. That buffer is exactly what goes on the
wire (sliced into chunks) and exactly the data section of a safetensors file, so the coordinator
serializes a model once per round and serves every client from the same bytes. No Python object
serialization, ever.

torch is imported lazily: the coordinator can aggregate with numpy alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np

from fedcore import checksums
from fedcore.durable import DIRECT_MIN, page_aligned_zeros
from fedcore.limits import excerpt, excerpts

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("fedgrpc's wire format is little-endian; big-endian hosts are unsupported")

DEFAULT_CHUNK_SIZE = 1 << 20

# Wire dtype -> (itemsize, numpy storage dtype, safetensors name). bfloat16 has no numpy dtype, so
# it is stored as uint16 and widened to float32 by bit shifting when arithmetic is needed.
_DTYPES: dict[str, tuple[int, str, str]] = {
    "float64": (8, "<f8", "F64"),
    "float32": (4, "<f4", "F32"),
    "float16": (2, "<f2", "F16"),
    "bfloat16": (2, "<u2", "BF16"),
    "int64": (8, "<i8", "I64"),
    "int32": (4, "<i4", "I32"),
    "int16": (2, "<i2", "I16"),
    "int8": (1, "i1", "I8"),
    "uint8": (1, "u1", "U8"),
    "bool": (1, "?", "BOOL"),
}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
SAFETENSORS_TO_DTYPE = {st: name for name, (_, _, st) in _DTYPES.items()}


class ManifestError(ValueError):
    """A manifest or buffer that does not describe valid tensors."""


def dtype_itemsize(dtype: str) -> int:
    try:
        return _DTYPES[dtype][0]
    except KeyError:
        allowed = ", ".join(_DTYPES)
        raise ManifestError(f"unsupported dtype {excerpt(dtype)}; supported: {allowed}") from None


def safetensors_dtype(dtype: str) -> str:
    dtype_itemsize(dtype)
    return _DTYPES[dtype][2]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ManifestError("tensor name must not be empty")
        dtype_itemsize(self.dtype)
        if any(d < 0 for d in self.shape):
            raise ManifestError(
                f"tensor {excerpt(self.name)} has a negative dimension {excerpt(self.shape)}"
            )

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_itemsize(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        # Linear in the number of tensors: manifests come from clients, and a quadratic check
        # here once let one 7 MiB header hold the event loop for minutes.
        seen: set[str] = set()
        dupes: set[str] = set()
        for t in self.tensors:
            (dupes if t.name in seen else seen).add(t.name)
        if dupes:
            raise ManifestError(
                f"duplicate tensor names in manifest ({len(dupes)}): {excerpts(sorted(dupes))}"
            )

    @cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset, byte length) in the flat buffer."""
        out, pos = {}, 0
        for t in self.tensors:
            out[t.name] = (pos, t.nbytes)
            pos += t.nbytes
        return out

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @cached_property
    def _by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    def spec(self, name: str) -> TensorSpec:
        return self._by_name[name]

    def floats(self) -> Manifest:
        """The tensors a model update carries: floating point ones (parameters, BN statistics)."""
        return Manifest(tuple(t for t in self.tensors if t.is_float))

    def with_dtype(self, dtype: str) -> Manifest:
        return Manifest(tuple(TensorSpec(t.name, dtype, t.shape) for t in self.tensors))

    def describe(self) -> str:
        return ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in self.tensors)

    @cached_property
    def fingerprint(self) -> str:
        """BLAKE3 of the canonical manifest JSON (names, dtypes, shapes; no values): equal
        fingerprints mean a model's state_dict loads into the other's. A client sends it at
        Join, so a coordinator running another task or model refuses it with both named."""
        return version_hasher(self).hexdigest()


@dataclass
class FlatModel:
    """A manifest and the one contiguous buffer (uint8 numpy array) holding its tensors."""

    manifest: Manifest
    buffer: np.ndarray

    def __post_init__(self) -> None:
        if self.buffer.dtype != np.uint8 or self.buffer.ndim != 1:
            raise ManifestError("FlatModel buffer must be a 1-D uint8 array")
        if self.buffer.size != self.manifest.total_bytes:
            raise ManifestError(
                f"buffer holds {self.buffer.size} bytes but the manifest describes "
                f"{self.manifest.total_bytes}"
            )

    @classmethod
    def zeros(cls, manifest: Manifest) -> FlatModel:
        """A model of zeros. From a megabyte its buffer is pages of its own (page-aligned,
        untouched until written): written with O_DIRECT as a checkpoint without a copy, and,
        once it is replaced, summed into by the coordinator's next accumulator
        (fedcore.durable.PageRecycler) instead of fresh pages the kernel must zero."""
        n = manifest.total_bytes
        buffer = page_aligned_zeros(n, np.uint8) if n >= DIRECT_MIN else np.zeros(n, np.uint8)
        return cls(manifest, buffer)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor's storage (bfloat16 appears as uint16)."""
        spec = self.manifest.spec(name)
        off, n = self.manifest.offsets[name]
        return self.buffer[off : off + n].view(_DTYPES[spec.dtype][1]).reshape(spec.shape)

    def as_float32(self, name: str) -> np.ndarray:
        """A float32 copy of a floating tensor, for arithmetic."""
        spec = self.manifest.spec(name)
        raw = self.raw(name)
        if spec.dtype == "bfloat16":
            return bfloat16_bits_to_float32(raw)
        return raw.astype(np.float32)

    def assign_float32(self, name: str, values: np.ndarray) -> None:
        """Store float32 values into a floating tensor, rounding to its dtype."""
        spec = self.manifest.spec(name)
        target = self.raw(name)
        if spec.dtype == "bfloat16":
            target[...] = float32_to_bfloat16_bits(values.reshape(spec.shape))
        elif spec.dtype == "float16":
            # Saturated, not cast: float16 ends at 65504, so a float32 sum just above it (one
            # client's delta of 65504, the largest float16 it can send, added twice) became inf
            # and the published model with it. NaN stays NaN (the update checks refuse it).
            most = float(np.finfo(np.float16).max)
            target[...] = np.clip(values.reshape(spec.shape), -most, most)
        else:
            target[...] = values.reshape(spec.shape)

    def copy(self) -> FlatModel:
        return FlatModel(self.manifest, self.buffer.copy())

    @cached_property
    def version(self) -> str:
        """Content hash of manifest and bytes: equal versions mean bit-identical models."""
        return content_hash(self.manifest, self.buffer)

    @cached_property
    def checksum(self) -> str:
        """`xxh3_128:<hex>` of the bytes alone (ModelHeader.model_checksum): what a client
        checks a download against, ~5x cheaper than recomputing `version` (BLAKE3)."""
        return checksums.tagged(checksums.DEFAULT, self.buffer)

    def chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[memoryview]:
        return iter_chunks(self.buffer, chunk_size)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (a bfloat16 is a truncated float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (what torch does), NaN kept NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def version_hasher(manifest: Manifest, threads: int = 1) -> blake3.blake3:
    """BLAKE3 primed with the manifest as canonical JSON (unambiguous, unlike describe()).

    The coordinator hashes every model it makes (clients check a download by its cheaper
    `FlatModel.checksum` where the coordinator sends one); BLAKE3 does that ~5x faster than
    sha256 here, with the same 256-bit digest (fedcore/checksums.py)."""
    canonical = json.dumps(manifest_to_dict(manifest), separators=(",", ":"), sort_keys=True)
    return blake3.blake3(canonical.encode(), max_threads=threads)


# Buffers from this size are hashed on every core: the version of each new model is on the
# round's critical path (clients wait for it), ~0.75 s per 2.4 GB on one core; 600 MB took
# 0.61-0.70 s on two threads against 0.95-1.52 s on one, on a loaded 2-core machine. The
# digest does not depend on the number of threads.
PARALLEL_HASH_BYTES = 64 << 20


def content_hash(manifest: Manifest, buffer: np.ndarray | bytes | memoryview) -> str:
    data = memoryview(buffer)
    big = data.nbytes >= PARALLEL_HASH_BYTES
    h = version_hasher(manifest, blake3.blake3.AUTO if big else 1)
    h.update(data)
    return h.hexdigest()


def iter_chunks(buffer: np.ndarray | bytes | memoryview, chunk_size: int) -> Iterator[memoryview]:
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    view = memoryview(buffer).cast("B")
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]


def download_check(manifest: Manifest, checksum: str) -> tuple[checksums.Hasher, str | None]:
    """How a model download is checked: the hasher its bytes go through, and the digest they
    must have when `checksum` (ModelHeader.model_checksum) is in an algorithm we know; None
    means the version recipe instead (an older coordinator sends no checksum), and the caller
    compares the digest with the announced version."""
    tagged = checksums.parse_tagged(checksum)
    if tagged is None:
        return version_hasher(manifest), None
    return checksums.new_hasher(tagged[0]), tagged[1]


class ChunkAssembler:
    """Receives a byte stream of known length into one preallocated buffer (no per-chunk copies).

    `checksum`: the stream's ModelHeader.model_checksum (or strategy_checksum). In an algorithm
    we know, the bytes are checked against it and the announced version is taken as theirs;
    otherwise (empty: an older coordinator) they are hashed by the version recipe and checked
    against the version, ~5x slower (BLAKE3 against XXH3: 48 ms of CPU per round of eight
    clients pulling 40 MB, a sixth of the coordinator's own)."""

    def __init__(
        self, manifest: Manifest, checksum: str = "", buffer: np.ndarray | None = None
    ) -> None:
        """`buffer`: uint8 memory of the stream's size to fill instead of a fresh array (a
        client's last update, recycled: the kernel zeroes every page of a fresh one, 0.25 s of
        CPU per 2.4 GB)."""
        self.manifest = manifest
        if buffer is None:
            buffer = np.empty(manifest.total_bytes, dtype=np.uint8)
        elif buffer.dtype != np.uint8 or buffer.shape != (manifest.total_bytes,):
            raise ValueError(f"a recycled buffer must be {manifest.total_bytes} uint8 bytes")
        self.buffer = buffer
        self.received = 0
        self._hash, self._checksum = download_check(manifest, checksum)

    def add(self, data: bytes | memoryview) -> None:
        end = self.received + len(data)
        if end > self.buffer.size:
            raise ManifestError(
                f"stream carries more than the {self.buffer.size} bytes its manifest describes"
            )
        self.buffer[self.received : end] = np.frombuffer(data, dtype=np.uint8)
        self._hash.update(data)
        self.received = end

    def finish(self, expected_version: str | None = None) -> FlatModel:
        if self.received != self.buffer.size:
            raise ManifestError(
                f"stream ended after {self.received} of {self.buffer.size} bytes (truncated)"
            )
        digest = self._hash.hexdigest()
        version: str | None = digest
        if self._checksum is not None:
            if digest != self._checksum:
                raise ManifestError("model bytes do not match the announced checksum (corrupted)")
            version = expected_version
        elif expected_version is not None and digest != expected_version:
            raise ManifestError("model bytes do not match the announced version (corrupted)")
        flat = FlatModel(self.manifest, self.buffer)
        # The bytes were checked as they streamed: seed `version` (a cached_property) instead
        # of hashing the whole model again when the client compares it (0.75 s per 2.4 GB).
        if version is not None:
            flat.__dict__["version"] = version
        return flat


# ---------------------------------------------------------------- torch and numpy adapters


def _torch_dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    dtype_itemsize(name)
    return name


def state_manifest(state: Mapping[str, torch.Tensor]) -> Manifest:
    """The manifest of a state_dict (what flatten_state_dict's FlatModel would carry)."""
    return Manifest(
        tuple(
            TensorSpec(name, _torch_dtype_name(t), tuple(int(d) for d in t.shape))
            for name, t in state.items()
        )
    )


def flatten_state_dict(state: Mapping[str, torch.Tensor]) -> FlatModel:
    """state_dict -> FlatModel, bit-exact for every supported dtype including 0-d tensors."""
    import torch

    flat = FlatModel.zeros(state_manifest(state))
    specs = flat.manifest.tensors
    for spec, tensor in zip(specs, state.values(), strict=True):
        off, n = flat.manifest.offsets[spec.name]
        if n:
            src = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            flat.buffer[off : off + n] = src.numpy()
    return flat


def to_state_dict(flat: FlatModel, copy: bool = True) -> dict[str, torch.Tensor]:
    """FlatModel -> state_dict of fresh tensors (copies, safe to train in place).

    `copy=False`: views of the buffer instead, for `load_state_dict`, which copies them into
    the model anyway (a copy here would hold a third model-sized buffer while it loads)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for spec in flat.manifest.tensors:
        off, n = flat.manifest.offsets[spec.name]
        dtype = getattr(torch, spec.dtype)
        if n == 0:
            out[spec.name] = torch.empty(spec.shape, dtype=dtype)
            continue
        part = flat.buffer[off : off + n]
        raw = torch.from_numpy(part.copy() if copy else part)
        out[spec.name] = raw.view(dtype).reshape(spec.shape)
    return out


def flatten_arrays(arrays: Mapping[str, np.ndarray]) -> FlatModel:
    """numpy arrays (no bfloat16) -> FlatModel."""
    names = {np.dtype(v).name: v for v in _DTYPES if v != "bfloat16"}
    specs = []
    for name, arr in arrays.items():
        dtype = np.dtype(arr.dtype).name
        if dtype not in names:
            raise ManifestError(f"array {name!r} has unsupported dtype {dtype}")
        specs.append(TensorSpec(name, dtype, tuple(int(d) for d in arr.shape)))
    flat = FlatModel.zeros(Manifest(tuple(specs)))
    for spec, arr in zip(specs, arrays.values(), strict=True):
        flat.raw(spec.name)[...] = arr
    return flat


def manifest_to_dict(manifest: Manifest) -> list[dict[str, Any]]:
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in manifest.tensors]


# ---------------------------------------------------------------- the float vector of a model
# Updates carry the floating-point tensors only, as one float32 vector in manifest order.
# Integer and bool tensors (step counters, masks) stay as the coordinator has them.


def float_vector(flat: FlatModel) -> np.ndarray:
    """The model's floating tensors concatenated as one float32 vector (a copy)."""
    floats = flat.manifest.floats()
    out = np.empty(sum(t.numel for t in floats.tensors), dtype=np.float32)
    pos = 0
    for t in floats.tensors:
        out[pos : pos + t.numel] = flat.as_float32(t.name).reshape(-1)
        pos += t.numel
    return out


def with_float_vector(flat: FlatModel, vector: np.ndarray) -> FlatModel:
    """A copy of `flat` whose floating tensors are replaced by `vector` (rounded to each dtype)."""
    floats = flat.manifest.floats().tensors
    expected = sum(t.numel for t in floats)
    if vector.size != expected:
        raise ManifestError(f"vector has {vector.size} values, the model's floats {expected}")
    out = flat.copy()
    pos = 0
    for t in floats:
        out.assign_float32(t.name, vector[pos : pos + t.numel])
        pos += t.numel
    return out
