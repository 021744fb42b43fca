"""The state dir protects itself: one coordinator at a time, torn writes swept away, owner-only
files and folders whatever the umask."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.tensors import flatten_state_dict
from fedserver.state.history import RoundRecord
from fedserver.state.store import StateDirBusy, StateStore, export_model


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


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)) or ".": stat.S_IMODE(p.stat().st_mode)
        for p in [root, *root.rglob("*")]
    }


@pytest.mark.usefixtures("open_umask")
def test_every_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "state"
    model = flatten_state_dict({"w": torch.arange(6, dtype=torch.float32)})
    store = StateStore(state)
    try:
        store.write_checkpoint(0, model, {"momentum": np.zeros(6, dtype=np.float32)})
        store.publish_model(model, 0)
        store.commit_round(RoundRecord(0, model.version, 0, 0, {}, 0.0, 0.0, 0.0, 1), [])
        store.record_client("client-0", {"site": "a"})
        export_model(state, tmp_path / "export.safetensors", None)
        modes = _modes(state)  # while open: state.db-wal and -shm exist
    finally:
        store.close()
    assert {"state.db", "state.db-wal", "state.db-shm", "lock", "model.safetensors"} <= set(modes)
    assert "checkpoints/round-0000.strategy.safetensors" in modes
    folders = {".", "checkpoints", "incoming"}
    assert {name: mode for name, mode in modes.items() if name in folders} == dict.fromkeys(
        folders, 0o700
    )
    assert {name: mode for name, mode in modes.items() if name not in folders} == dict.fromkeys(
        set(modes) - folders, 0o600
    )
    assert stat.S_IMODE((tmp_path / "export.safetensors").stat().st_mode) == 0o600


def test_a_state_dir_open_to_others_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="fedserver"):
        StateStore(state).close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert f"{state} was mode 755 (open to other users); changed it to 700" in caplog.text
    caplog.clear()
    StateStore(state).close()  # already private: nothing to say
    assert "open to other users" not in caplog.text


def test_status_of_a_state_dir_we_may_not_read_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another user meets the 0700 dir as EACCES (not reproducible as root, hence the stub)."""
    import fedserver.cli

    def denied(state_dir: Path) -> None:
        raise PermissionError(13, "Permission denied", str(state_dir / "state.db"))

    monkeypatch.setattr(fedserver.cli, "read_status", denied)
    assert fedserver.cli.main(["status", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'state.db'}: permission denied" in err
    assert "--server" in err


def test_resuming_drops_the_fresh_model_before_reading_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the fresh model's manifest is needed to check a checkpoint: reading one while the
    task's round-0 model is still alive held two models, and a model over half of RAM could
    not resume."""
    import gc
    import weakref

    from fedserver.cli import build_parser
    from fedserver.commands.run import server_settings
    from fedserver.coordinator import assembly
    from fedserver.state.store import StateStore

    state = tmp_path / "state"
    argv = ["run", "--task", "bench.synthetic:params_1000", "--state-dir", str(state)]
    settings = server_settings(build_parser().parse_args(argv))
    first = assembly.build_coordinator(settings)
    first.store.write_checkpoint(0, first.model, {})
    first.store.close()

    fresh: list[weakref.ref[object]] = []
    built = assembly.initial_model

    def remembered(task: object, seed: int) -> object:
        model = built(task, seed)
        fresh.append(weakref.ref(model))
        return model

    alive_at_load: list[bool] = []
    load = StateStore.load_checkpoint

    def checked(self: StateStore, round_number: int) -> object:
        gc.collect()
        alive_at_load.append(fresh[0]() is not None)
        return load(self, round_number)

    monkeypatch.setattr(assembly, "initial_model", remembered)
    monkeypatch.setattr(StateStore, "load_checkpoint", checked)
    second = assembly.build_coordinator(settings)
    second.store.close()
    assert alive_at_load == [False]
