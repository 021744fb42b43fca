"""Encrypted state at rest: sealed safetensors round-trip, and every kind of damage is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.files import read_safetensors, write_safetensors
from fedcore.sealed import SealedError, StateCipher, generate_key_file
from fedcore.tensors import FlatModel, Manifest, ManifestError, flatten_state_dict

pytestmark = pytest.mark.timeout(60)


def _model() -> FlatModel:
    g = torch.Generator().manual_seed(0)
    return flatten_state_dict(
        {
            "w": torch.randn(40, 30, generator=g),
            "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "steps": torch.tensor(3, dtype=torch.int64),
        }
    )


def _cipher(tmp_path: Path, name: str = "k.key", segment_size: int = 1000) -> StateCipher:
    path = tmp_path / name
    generate_key_file(path)
    # Small segments so a 5 KB model spans several, exercising the segment bookkeeping.
    return StateCipher.from_key_file(path, segment_size)


def test_round_trip_across_segments_and_no_plaintext(tmp_path: Path) -> None:
    model, cipher = _model(), _cipher(tmp_path)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, model, {"round": "2"}, cipher, "checkpoint:round-0002")
    got, meta = read_safetensors(path, cipher, "checkpoint:round-0002")
    assert got.manifest == model.manifest
    assert got.version == model.version
    assert meta == {"round": "2"}
    blob = path.read_bytes()
    raw = model.raw("w").tobytes()
    assert all(raw[i : i + 16] not in blob for i in range(0, len(raw) - 16, 16))
    assert b'"dtype"' not in blob  # the safetensors header is encrypted too


def test_segment_size_boundaries(tmp_path: Path) -> None:
    # Plaintext length exactly a multiple of the segment, and an empty model.
    for seg in (8, 64, 1 << 20):
        cipher = _cipher(tmp_path, f"k{seg}.key", seg)
        for flat in (_model(), FlatModel(Manifest(()), np.zeros(0, np.uint8))):
            path = tmp_path / f"m{seg}.safetensors"
            write_safetensors(path, flat, None, cipher, "model")
            assert read_safetensors(path, cipher, "model")[0].version == flat.version


def test_wrong_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, _model(), None, _cipher(tmp_path, "a.key"), "model")
    with pytest.raises(SealedError, match="wrong key"):
        read_safetensors(path, _cipher(tmp_path, "b.key"), "model")


@pytest.mark.parametrize("where", ["header_length", "role", "body_first", "body_middle", "tag"])
def test_one_flipped_byte_is_refused(tmp_path: Path, where: str) -> None:
    cipher = _cipher(tmp_path)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, _model(), None, cipher, "model")
    blob = bytearray(path.read_bytes())
    header_len = 8 + 8 + 4 + 8 + 12 + 2 + len("model")
    index = {
        "header_length": 8 + 8 + 4,  # the plaintext length field
        "role": header_len - 1,
        "body_first": header_len,
        "body_middle": header_len + len(blob[header_len:]) // 2,
        "tag": len(blob) - 1,
    }[where]
    blob[index] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(SealedError):
        read_safetensors(path, cipher, "model")


def test_truncated_swapped_and_mixed_files_are_refused(tmp_path: Path) -> None:
    cipher = _cipher(tmp_path)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, _model(), None, cipher, "checkpoint:round-0003")
    with pytest.raises(SealedError, match="expected 'checkpoint:round-0004'"):
        read_safetensors(path, cipher, "checkpoint:round-0004")
    with pytest.raises(SealedError, match="is encrypted; pass the key"):
        read_safetensors(path)
    blob = path.read_bytes()
    path.write_bytes(blob[:-20])
    with pytest.raises(SealedError, match="truncated"):
        read_safetensors(path, cipher, "checkpoint:round-0003")
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, _model())
    with pytest.raises(SealedError, match="not encrypted"):
        read_safetensors(plain, cipher, "model")


def test_key_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    generate_key_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(SealedError, match="already exists"):
        generate_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(SealedError, match="chmod 600"):
        StateCipher.from_key_file(path)
    bad = tmp_path / "bad.key"
    bad.write_text("hello")
    bad.chmod(0o600)
    with pytest.raises(ManifestError, match="not a fedgrpc state key"):
        StateCipher.from_key_file(bad)


@pytest.mark.usefixtures("open_umask")
def test_keygen_refuses_to_overwrite_and_force_always_writes_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedserver.cli import main

    path = tmp_path / "state.key"
    assert main(["keygen", str(path)]) == 0
    first = path.read_text()
    assert main(["keygen", str(path)]) == 2  # a usage error, like the CLI's others
    assert "already exists" in capsys.readouterr().err
    assert path.read_text() == first
    os.chmod(path, 0o644)  # a loosened key file is not "kept" by --force
    assert main(["keygen", str(path), "--force"]) == 0
    assert path.read_text() != first
    assert (path.stat().st_mode & 0o777) == 0o600
