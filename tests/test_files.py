"""Crash-safe writes and safetensors interoperability in both directions."""

from __future__ import annotations

import json
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from fedcore.files import SHARED, atomic_link, atomic_write, read_safetensors, write_safetensors
from fedcore.tensors import ManifestError, flatten_state_dict, to_state_dict
from tests.state_checks import assert_same_state


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "half": torch.tensor([0.1, float("inf"), -0.0], dtype=torch.float16),
        "double": torch.randn(2, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "ids": torch.tensor([-5, 9], dtype=torch.int32),
        "small": torch.tensor([-128, 127], dtype=torch.int8),
        "pixels": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
    }


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- interoperability


def test_written_file_loads_with_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    metadata = {"round": "3", "format": "fedgrpc"}
    write_safetensors(path, flatten_state_dict(_state()), metadata)
    assert_same_state(load_file(path), _state(), ordered=False)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(_state())
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len % 8 == 0


def test_written_file_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, flatten_state_dict(_state()))
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() is None
    flat, metadata = read_safetensors(path)
    assert metadata == {}
    assert flat.version == flatten_state_dict(_state()).version


def test_file_saved_by_safetensors_reads_back_identically(tmp_path: Path) -> None:
    path = tmp_path / "theirs.safetensors"
    save_file(_state(), path, metadata={"origin": "safetensors"})
    flat, metadata = read_safetensors(path)
    assert metadata == {"origin": "safetensors"}
    assert_same_state(to_state_dict(flat), _state(), ordered=False)


def test_write_read_round_trip_keeps_order_and_version(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "model.safetensors"  # parents are created
    flat = flatten_state_dict(_state())
    write_safetensors(path, flat, {"k": "v"})
    back, metadata = read_safetensors(path)
    assert back.manifest == flat.manifest
    assert back.version == flat.version
    assert metadata == {"k": "v"}


# ---------------------------------------------------------------- atomic_write


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    atomic_write(path, [b"new ", memoryview(b"content")])
    assert path.read_bytes() == b"new content"
    assert _files(tmp_path) == ["f.bin"]


def test_atomic_write_failing_midway_keeps_old_content(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content")

    def parts() -> Iterator[bytes]:
        yield b"partial " * 1000
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, parts())
    assert path.read_bytes() == b"old content"
    assert _files(tmp_path) == ["f.bin"]


def test_atomic_write_failing_midway_creates_nothing(tmp_path: Path) -> None:
    def parts() -> Iterator[bytes]:
        yield b"x"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", parts())
    assert _files(tmp_path) == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_atomic_write_is_owner_only_and_never_keeps_an_old_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret.bin"
    atomic_write(path, [b"one"])
    assert _mode(path) == 0o600  # not the umask's 0644
    path.chmod(0o644)
    atomic_write(path, [b"two"])  # a new inode: the loosened mode is not inherited
    assert (path.read_bytes(), _mode(path)) == (b"two", 0o600)
    write_safetensors(tmp_path / "m.safetensors", flatten_state_dict(_state()))
    assert _mode(tmp_path / "m.safetensors") == 0o600
    atomic_write(tmp_path / "report.csv", [b"x"], SHARED)  # meant to be read: the umask's
    assert _mode(tmp_path / "report.csv") == 0o644


def test_atomic_write_without_overwrite_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    atomic_write(path, [b"first"], overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write(path, [b"second"], overwrite=False)
    assert path.read_bytes() == b"first"
    assert _files(tmp_path) == ["key"]  # no temp file left behind


# ---------------------------------------------------------------- damaged files


def _good_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, flatten_state_dict(_state()), {"round": "1"})
    return path


def _with_header(tmp_path: Path, header: bytes, data: bytes = b"") -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_truncated_data_section_is_rejected(tmp_path: Path) -> None:
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ManifestError, match="truncated or corrupt"):
        read_safetensors(path)


def test_trailing_bytes_are_rejected(tmp_path: Path) -> None:
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ManifestError, match="wrong length"):
        read_safetensors(path)


@pytest.mark.parametrize("size", [0, 5])
def test_file_shorter_than_the_length_prefix_is_rejected(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(ManifestError, match="too short"):
        read_safetensors(path)


def test_truncated_header_is_rejected(tmp_path: Path) -> None:
    path = _good_file(tmp_path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    path.write_bytes(path.read_bytes()[: 8 + n // 2])
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_safetensors(path)


@pytest.mark.parametrize("header", [b"\xff\xfe\x00garbage", b"{not json", b"   "])
def test_garbage_header_is_rejected(tmp_path: Path, header: bytes) -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_safetensors(_with_header(tmp_path, header))


def test_implausible_header_length_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ManifestError, match="implausibly large"):
        read_safetensors(path)


def test_unsupported_dtype_is_rejected(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    path = _with_header(tmp_path, json.dumps(header).encode(), b"\x00\x00")
    with pytest.raises(ManifestError, match="unsupported dtype F8_E4M3"):
        read_safetensors(path)


@pytest.mark.parametrize(
    "offsets",
    [[0, 4], [4, 12], [0, 12]],  # too short for the shape / a gap before it / too long
)
def test_inconsistent_offsets_are_rejected(tmp_path: Path, offsets: list[int]) -> None:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}
    path = _with_header(tmp_path, json.dumps(header).encode(), b"\x00" * 12)
    with pytest.raises(ManifestError, match="inconsistent data offsets"):
        read_safetensors(path)


def test_negative_shape_is_rejected(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}
    with pytest.raises(ManifestError, match="negative dimension"):
        read_safetensors(_with_header(tmp_path, json.dumps(header).encode()))


@pytest.mark.parametrize(
    "header",
    [
        b"[]",
        b'"text"',
        b'{"w": 5}',
        b'{"w": {"dtype": "F32", "shape": [1]}}',
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}',
        b'{"w": {"dtype": "F32", "shape": 3, "data_offsets": [0, 12]}}',
    ],
)
def test_well_formed_json_with_a_wrong_structure_is_rejected(tmp_path: Path, header: bytes) -> None:
    with pytest.raises(ManifestError):
        read_safetensors(_with_header(tmp_path, header, b"\x00" * 12))


def test_atomic_link_publishes_an_existing_file_without_copying(tmp_path: Path) -> None:
    source = tmp_path / "checkpoints" / "round-0001.safetensors"
    atomic_write(source, [b"model bytes"])
    target = tmp_path / "model.safetensors"
    atomic_write(target, [b"old"])
    atomic_link(source, target)
    assert target.read_bytes() == b"model bytes"
    assert target.stat().st_ino == source.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model.safetensors"]
    # Replacing the source later (by rename, as every writer here does) leaves the link intact.
    atomic_write(source, [b"next"])
    assert target.read_bytes() == b"model bytes"


def test_store_publishes_an_unsealed_model_as_a_link_to_its_checkpoint(tmp_path: Path) -> None:
    from fedserver.state.store import StateStore

    flat = flatten_state_dict({"w": torch.arange(6, dtype=torch.float32)})
    store = StateStore(tmp_path / "state")
    try:
        store.write_checkpoint(3, flat, {})
        store.publish_model(flat, 3)
        assert store.model_path.stat().st_ino == store.checkpoint_path(3).stat().st_ino
        other = flatten_state_dict({"w": torch.zeros(6)})
        store.publish_model(other, 3)  # not what the checkpoint holds: written, not linked
        assert store.model_path.stat().st_ino != store.checkpoint_path(3).stat().st_ino
        assert read_safetensors(store.model_path)[0].version == other.version
    finally:
        store.close()


@pytest.mark.parametrize("supported", [True, False])
def test_direct_write_gives_the_same_bytes_whatever_the_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supported: bool
) -> None:
    """O_DIRECT writes (checkpoints of a model's size) through an aligned buffer: parts of any
    size, a last block padded then cut back; a file system that refuses O_DIRECT (tmpfs)
    gets the same bytes written through the page cache."""
    from fedcore import durable

    monkeypatch.setattr(durable, "DIRECT_BLOCK", 3 * 4096)
    if not supported:
        monkeypatch.setattr(durable, "_set_direct", lambda fd, on: False)
    parts = [b"h" * 100, bytes(range(256)) * 97, memoryview(b"x" * 40000), b"", b"tail"]
    path = tmp_path / "model.safetensors"
    atomic_write(path, parts, direct=True)
    assert path.read_bytes() == b"".join(bytes(p) for p in parts)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write(path, [b"a" * 4096 * 3], direct=True)  # exactly whole blocks
    assert path.read_bytes() == b"a" * 4096 * 3
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_direct_write_from_page_aligned_memory_copies_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page-aligned buffer (the FedAvg accumulator that becomes the new model) after a
    page-padded header is written with O_DIRECT from where it is: only the header and the
    unaligned tail go through the aligned buffer, and the file holds the same bytes."""
    from fedcore import durable

    monkeypatch.setattr(durable, "DIRECT_BLOCK", 3 * 4096)
    values = durable.page_aligned_zeros(10 * 4096 + 7, np.uint8)
    values[:] = np.arange(values.size) % 251
    assert values.ctypes.data % durable.PAGE == 0 and durable.owns_its_pages(values)
    writes: list[tuple[int, int]] = []  # (address, length) of every write
    real_write = durable.os.write

    def recording(fd: int, data: memoryview) -> int:
        writes.append((durable._address(memoryview(data)), len(data)))
        return real_write(fd, data)

    monkeypatch.setattr(durable.os, "write", recording)
    header = b"h" * 4096
    path = tmp_path / "model.safetensors"
    atomic_write(path, [header, memoryview(values)], direct=True)
    assert path.read_bytes() == header + values.tobytes()
    base = values.ctypes.data
    from_values = [(a - base, n) for a, n in writes if base <= a < base + values.size]
    assert from_values == [
        (0, 3 * 4096),
        (3 * 4096, 3 * 4096),
        (6 * 4096, 3 * 4096),
        (9 * 4096, 4096),
    ]
    assert sum(n for _, n in writes) == 4096 + 10 * 4096 + 4096  # header, values, padded tail


def test_a_big_checkpoint_puts_its_data_at_a_page(tmp_path: Path) -> None:
    """Checkpoints written with O_DIRECT pad the safetensors header (spaces, as the format
    allows) so the data starts at a page; safetensors reads them as any other file."""
    from safetensors.numpy import load_file as load_numpy

    from fedcore.durable import DIRECT_MIN, PAGE
    from fedcore.files import safetensors_header
    from fedserver.state.store import StateStore

    flat = flatten_state_dict({"w": torch.arange(DIRECT_MIN // 4, dtype=torch.float32)})
    store = StateStore(tmp_path / "state")
    try:
        store.write_checkpoint(1, flat, {})
        path = store.checkpoint_path(1)
        data_start = path.stat().st_size - flat.buffer.nbytes
        assert data_start % PAGE == 0 and len(safetensors_header(flat)) % 8 == 0
        expected = np.arange(DIRECT_MIN // 4, dtype=np.float32)
        assert np.array_equal(load_numpy(str(path))["w"], expected)
        assert read_safetensors(path)[0].version == flat.version
    finally:
        store.close()


def test_copy_streams_a_checkpoint_and_refuses_a_wrong_version(tmp_path: Path) -> None:
    """`fedserver export` copies block by block (a model larger than RAM exports too): the
    same bytes as a write of the model; a data section that does not hash to the recorded
    version leaves no output."""
    from fedcore.files import copy_safetensors
    from fedcore.tensors import flatten_arrays

    flat = flatten_arrays({"a": np.arange(5000, dtype=np.float32), "b": np.ones(3, np.int64)})
    src, out = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    meta = {"round": "3", "model_version": flat.version}
    write_safetensors(src, flat, meta)
    got_meta, version = copy_safetensors(src, out, block=1000)
    assert (got_meta, version) == (meta, flat.version)
    assert out.read_bytes() == src.read_bytes()
    write_safetensors(src, flat, {**meta, "model_version": "0" * 64})
    out.unlink()
    with pytest.raises(ValueError, match="recorded model version"):
        copy_safetensors(src, out, block=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
