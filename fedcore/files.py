"""Crash-safe files and the safetensors format for FlatModels.

A FlatModel's buffer is laid out exactly like a safetensors data section, so a checkpoint is one
JSON header plus one write of the buffer, and reading one is a single read into a fresh buffer.
The format (8-byte little-endian header length, JSON header, data) is specified by the safetensors
project; tests check interoperability with the `safetensors` library in both directions.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

# Re-exported: the durable writes are used through this module across the code base.
from fedcore.durable import DIRECT_MIN
from fedcore.durable import PRIVATE as PRIVATE
from fedcore.durable import SHARED as SHARED
from fedcore.durable import atomic_link as atomic_link
from fedcore.durable import atomic_write as atomic_write
from fedcore.durable import fsync_dir as fsync_dir
from fedcore.sealed import MAGIC, SealedError, StateCipher
from fedcore.tensors import (
    SAFETENSORS_TO_DTYPE,
    FlatModel,
    Manifest,
    ManifestError,
    TensorSpec,
    safetensors_dtype,
    version_hasher,
)

_MAX_HEADER = 100 << 20


def safetensors_header(
    flat: FlatModel, metadata: Mapping[str, str] | None = None, align: int = 8
) -> bytes:
    return manifest_header(flat.manifest, metadata, align)


def manifest_header(
    manifest: Manifest, metadata: Mapping[str, str] | None = None, align: int = 8
) -> bytes:
    """The 8-byte length and JSON header of a safetensors file of `manifest`'s tensors, padded
    with spaces (as the format allows) so that the data starts at a multiple of `align`: 8, as
    the format recommends, or a page for files written with O_DIRECT (fedcore.durable)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for spec in manifest.tensors:
        off, n = manifest.offsets[spec.name]
        header[spec.name] = {
            "dtype": safetensors_dtype(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [off, off + n],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % align)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: Path,
    flat: FlatModel,
    metadata: Mapping[str, str] | None = None,
    cipher: StateCipher | None = None,
    role: str = "",
) -> None:
    """Write atomically; with a cipher the file is sealed (see fedcore/sealed.py) under `role`."""
    parts: Iterable[bytes | memoryview] = [
        safetensors_header(flat, metadata),
        memoryview(flat.buffer),
    ]
    big = flat.buffer.nbytes >= DIRECT_MIN  # a model's size: past the page cache (durable.py)
    atomic_write(path, cipher.seal(parts, role) if cipher else parts, direct=big)


def _is_int_list(value: object, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and (length is None or len(value) == length)
    )


def _parse_header(
    path: Path, header: object
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """Check the header's structure so a damaged file fails with ManifestError, not KeyError."""
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ManifestError(f"{path}: __metadata__ is not an object")
    for name, info in header.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and _is_int_list(info.get("shape"))
            and _is_int_list(info.get("data_offsets"), 2)
        ):
            raise ManifestError(f"{path}: entry for tensor {name!r} is malformed")
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _open_for_read(path: Path, cipher: StateCipher | None, role: str) -> BinaryIO:
    if cipher is not None:
        return cipher.open(path, role)  # type: ignore[return-value]
    f = open(path, "rb")  # noqa: SIM115 - returned to a with block
    if f.read(len(MAGIC)) == MAGIC:
        f.close()
        raise SealedError(f"{path} is encrypted; pass the key file it was written with")
    f.seek(0)
    return f


def read_safetensors(
    path: Path, cipher: StateCipher | None = None, role: str = ""
) -> tuple[FlatModel, dict[str, str]]:
    """Read a safetensors file into a FlatModel (tensors in data-offset order) and its metadata.

    With a cipher the file must be sealed under `role`; every byte is authenticated before use.
    """
    path = Path(path)
    with _open_for_read(path, cipher, role) as f:
        manifest, metadata = _read_header(f, path)
        model = FlatModel.zeros(manifest)
        got = f.readinto(memoryview(model.buffer))
        if got != model.buffer.size or f.read(1):
            raise ManifestError(
                f"{path}: data section has the wrong length (truncated or corrupt file)"
            )
    return model, metadata


def copy_safetensors(
    source: Path,
    out: Path,
    cipher: StateCipher | None = None,
    role: str = "",
    block: int = 16 << 20,
) -> tuple[dict[str, str], str]:
    """Copy a safetensors file (sealed under `role` with a cipher) to a plain one at `out`,
    `block` bytes at a time: memory O(block) whatever the model's size. The data's version is
    checked against the recorded one before `out` appears (ValueError; `out` untouched, as for
    a wrong key or a tampered file). Returns the metadata and the version."""
    source = Path(source)
    with _open_for_read(source, cipher, role) as f:
        manifest, metadata = _read_header(f, source)
        hasher = version_hasher(manifest)

        def parts() -> Iterator[bytes | memoryview]:
            yield manifest_header(manifest, metadata)
            buffer = memoryview(bytearray(min(block, manifest.total_bytes) or 1))
            left = manifest.total_bytes
            while left:
                got = f.readinto(buffer[: min(len(buffer), left)])
                if not got:
                    raise ManifestError(f"{source}: data section is truncated")
                hasher.update(buffer[:got])
                yield buffer[:got]  # written before the next block is read into it
                left -= got
            if f.read(1):
                raise ManifestError(f"{source}: data section has the wrong length")
            if metadata.get("model_version") not in (None, hasher.hexdigest()):
                raise ValueError(f"{source} does not match its recorded model version")

        atomic_write(Path(out), parts(), direct=manifest.total_bytes >= DIRECT_MIN)
    return metadata, hasher.hexdigest()


def _read_header(f: BinaryIO, path: Path) -> tuple[Manifest, dict[str, str]]:
    """The manifest (tensors in data-offset order) and metadata; `f` left at the data."""
    head = f.read(8)
    if len(head) != 8:
        raise ManifestError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise ManifestError(f"{path}: header of {n} bytes is implausibly large")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: header is not valid JSON ({e})") from None
    entries, metadata = _parse_header(path, header)
    specs, pos = [], 0
    for name, info in entries:
        begin, end = info["data_offsets"]
        if info["dtype"] not in SAFETENSORS_TO_DTYPE:
            raise ManifestError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        spec = TensorSpec(name, SAFETENSORS_TO_DTYPE[info["dtype"]], tuple(info["shape"]))
        if begin != pos or end - begin != spec.nbytes:
            raise ManifestError(f"{path}: tensor {name!r} has inconsistent data offsets")
        specs.append(spec)
        pos = end
    return Manifest(tuple(specs)), metadata
