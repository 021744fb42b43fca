"""The state dir protects itself: one coordinator at a time, torn writes swept away."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedserver.store import StateDirBusy, StateStore


def test_second_store_on_the_same_dir_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    with pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
        StateStore(tmp_path)
    first.close()
    StateStore(tmp_path).close()  # the lock went with the first store


def test_temp_files_of_torn_writes_are_removed_on_open(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    torn = [
        tmp_path / "checkpoints" / ".round-0003.safetensors.k2j4.tmp",
        tmp_path / ".model.safetensors.x81a.tmp",
    ]
    for path in torn:
        path.write_bytes(b"half a checkpoint")
    kept = tmp_path / "checkpoints" / "round-0002.safetensors"
    kept.write_bytes(b"not ours to judge")
    StateStore(tmp_path).close()
    assert not any(p.exists() for p in torn)
    assert kept.exists()
