"""--encrypt-state with real processes: no plaintext tensors on disk, resume, bad key, tampering."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.digits import task
from fedcore.tensors import to_state_dict
from fedserver.coordinator.central_eval import initial_model
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    start_client,
    start_coordinator,
    start_serving,
    wait_finished,
)
from tests.state_checks import raw_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


def _train(logs: Path, state: Path, key: Path, rounds: int, procs: list[Proc], tag: str) -> None:
    port = free_port()
    args = ("--rounds", str(rounds), "--min-clients", "2", "--encrypt-state", str(key))
    server = start_serving(procs, logs, port, state, *args, name=f"server-{tag}")
    clients = [start_client(logs, port, f"{i}/2", name=f"client-{i}-{tag}") for i in range(2)]
    procs.extend(clients)
    wait_finished(server, clients, 150)


def _windows(tensor: torch.Tensor, width: int = 32) -> list[bytes]:
    raw = raw_bytes(tensor)
    return [raw[i : i + width] for i in range(0, len(raw) - width, width * 8)]


@pytest.mark.usefixtures("open_umask")  # the processes inherit it: files must be private anyway
def test_encrypted_state_end_to_end(tmp_path: Path, procs: list[Proc]) -> None:
    state, logs, key = tmp_path / "state", tmp_path / "logs", tmp_path / "state.key"
    made = fedserver("keygen", str(key))
    assert made.returncode == 0, made.stderr
    _train(logs, state, key, 2, procs, "a")

    # Plain copies of the round-0 model and the current one, via export --decrypt.
    out = tmp_path / "export.safetensors"
    exported = fedserver(
        "export", "--state-dir", str(state), "--out", str(out), "--decrypt", "--key", str(key)
    )
    assert exported.returncode == 0, exported.stderr
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [state, *state.rglob("*"), out]}
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o700 if p.is_dir() else 0o600)}
    assert not wrong, f"state dir and export must be owner-only: {wrong}"
    current = load_file(out)
    round0 = to_state_dict(initial_model(task, 0))
    needles = [w for t in (*current.values(), *round0.values()) for w in _windows(t)]
    files = [p for p in state.rglob("*") if p.is_file()]
    assert len(files) >= 5  # model, 3 checkpoints, state.db (+ WAL)
    for path in files:
        blob = path.read_bytes()
        leaked = [n for n in needles if n in blob]
        assert not leaked, f"plaintext tensor bytes found in {path}"

    # Resuming without the key, or with another key, is refused with a clear message.
    other = tmp_path / "other.key"
    assert fedserver("keygen", str(other)).returncode == 0
    for extra, message in (
        ((), "is encrypted; pass the key"),
        (("--encrypt-state", str(other)), "wrong key"),
    ):
        port = free_port()
        server = start_coordinator(logs, port, state, "--rounds", "3", *extra, name="refused")
        procs.append(server)
        assert server.wait(60) == 2, server.log()
        assert message in server.log()

    # With the right key it resumes at round 3 and finishes.
    _train(logs, state, key, 3, procs, "b")
    status = fedserver("status", "--state-dir", str(state))
    assert "3/3 rounds" in status.stdout, status.stdout
    assert (
        fedserver(
            "export", "--state-dir", str(state), "--out", str(out), "--decrypt", "--key", str(key)
        ).returncode
        == 0
    )
    final = load_file(out)
    model = task.build_model()
    model.load_state_dict(final)
    assert task.evaluate(model, task.server_test_data())["accuracy"] >= 0.9
    assert any(not torch.equal(final[k], current[k]) for k in final)

    # One flipped byte in the model file: export refuses and writes nothing.
    model_file = state / "model.safetensors"
    blob = bytearray(model_file.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    model_file.write_bytes(bytes(blob))
    tampered = tmp_path / "tampered.safetensors"
    refused = fedserver(
        "export", "--state-dir", str(state), "--out", str(tampered), "--decrypt", "--key", str(key)
    )
    assert refused.returncode == 1
    assert "authentication failed" in refused.stderr
    assert not tampered.exists()
