"""`--secure he` end to end: a real coordinator (public CKKS context only) and real clients.

The same federation (digits, 3 IID clients, fixed seeds, one torch thread) runs once in plain
FedAvg and once under homomorphic aggregation; the HE run must reach the plain run's accuracy
within 1 point, and its model must match the plain one up to CKKS noise carried through training.
Bad encrypted updates are refused with INVALID_ARGUMENT and change nothing.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("tenseal")

from fedcore.he import PUBLIC_FILE, SECRET_FILE, HEAggregator, HEClient, HEError, generate_keys
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.wire import update_stream
from tests.procs import (
    Proc,
    free_port,
    start_clients,
    start_coordinator,
    start_serving,
    status_json,
    wait_finished,
    wait_serving,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
ROUNDS = 10


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the clients' secret context, the coordinator's public one), in separate directories."""
    secret, public = generate_keys(tmp_path_factory.mktemp("clients"))
    coordinator_dir = tmp_path_factory.mktemp("coordinator")
    moved = Path(shutil.move(public, coordinator_dir / PUBLIC_FILE))
    return secret, moved


def _federation(tmp: Path, procs: list[Proc], server_extra: list[str], client_extra: list[str]):  # type: ignore[no-untyped-def]
    port = free_port()
    state, logs = tmp / "state", tmp / "logs"
    rounds = ("--rounds", str(ROUNDS), "--min-clients", "3")
    server = start_serving(procs, logs, port, state, *rounds, *server_extra)
    clients = start_clients(procs, logs, port, 3, *client_extra)
    wait_finished(server, clients, 240)
    return server, clients, status_json(state), load_file(str(state / "model.safetensors"))


def test_he_reaches_fedavg_accuracy_without_the_secret_key(
    tmp_path: Path, procs: list[Proc], keys: tuple[Path, Path]
) -> None:
    secret, public = keys
    _, _, plain, plain_model = _federation(tmp_path / "plain", procs, [], [])
    server, clients, he, he_model = _federation(
        tmp_path / "he",
        procs,
        ["--secure", "he", "--he-public-key", str(public)],
        ["--he-key", str(secret)],
    )
    assert "public CKKS context" in server.log() and "(no secret key)" in server.log()
    assert not (public.parent / SECRET_FILE).exists()
    assert [r["participants"] for r in he["rounds"]] == [3] * ROUNDS
    assert "decrypted the encrypted aggregate" in "".join(c.log() for c in clients)
    acc_plain = plain["rounds"][-1]["metrics"]["accuracy"]
    acc_he = he["rounds"][-1]["metrics"]["accuracy"]
    drift = max(float(np.abs(he_model[k] - plain_model[k]).max()) for k in plain_model)
    plain_s = np.median([r["duration_seconds"] for r in plain["rounds"][1:]])
    he_s = np.median([r["duration_seconds"] for r in he["rounds"][1:]])
    print(
        f"\nafter {ROUNDS} rounds: accuracy FedAvg {acc_plain:.4f}, HE {acc_he:.4f}; max |weight "
        f"difference| {drift:.2e}; median round {plain_s:.3f}s plain, {he_s:.3f}s HE"
    )
    assert acc_he >= acc_plain - 0.01
    assert drift < 1e-3  # CKKS noise (~1e-8 per round) carried through 10 rounds of training


def _client_ciphertexts(secret: Path, size: int) -> list[bytes]:
    return HEClient(secret).encrypt(np.ones(size, dtype=np.float32), 3.0)


def test_coordinator_context_cannot_decrypt_an_update(keys: tuple[Path, Path]) -> None:
    secret, public = keys
    blobs = _client_ciphertexts(secret, 4810)
    with pytest.raises(HEError, match="contains the secret key"):
        HEAggregator(secret, 4810)  # the coordinator refuses to load a secret context
    aggregator = HEAggregator(public, 4810)
    import tenseal as ts

    for blob in blobs:
        vec = ts.ckks_vector_from(aggregator.ctx, blob)
        with pytest.raises(ValueError, match="secret"):
            vec.decrypt()


def _he_server(tmp: Path, procs: list[Proc], public: Path, *extra: str) -> tuple[Proc, int]:
    port = free_port()
    server = start_coordinator(
        tmp / "logs", port, tmp / "state", "--rounds", "1", "--min-clients", "2",
        "--secure", "he", "--he-public-key", str(public), *extra,
    )  # fmt: skip
    procs.append(server)
    return server, port


def test_secret_context_or_single_update_rounds_are_refused_at_startup(
    tmp_path: Path, procs: list[Proc], keys: tuple[Path, Path]
) -> None:
    secret, public = keys
    server, _ = _he_server(tmp_path / "a", procs, secret)
    assert server.wait(60) == 2
    assert "contains the secret key" in server.log()
    server, _ = _he_server(tmp_path / "b", procs, public, "--min-clients", "1")
    assert server.wait(60) == 2
    assert "at least 2" in server.log()


def _submit(stub: Any, header: pb.UpdateHeader, payload: bytes) -> grpc.StatusCode:
    digest = hashlib.sha256(payload).hexdigest()
    try:
        stub.SubmitUpdate(update_stream(header, np.frombuffer(payload, np.uint8), digest))
    except grpc.RpcError as e:
        return e.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def test_bad_encrypted_updates_are_refused_and_change_nothing(
    tmp_path: Path, procs: list[Proc], keys: tuple[Path, Path]
) -> None:
    secret, public = keys
    server, port = _he_server(tmp_path, procs, public)
    wait_serving(port, server)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for cid in ("a", "b"):
            stub.Join(pb.JoinRequest(client_id=cid))
        first = next(iter(stub.GetGlobalModel(pb.GetGlobalModelRequest(client_id="a"))))
        h = first.header
        assert h.config.encoding == "he-ckks" and h.config.extra["he"] == "1"
        size = sum(int(np.prod(t.shape)) for t in h.manifest.tensors)
        good = HEClient(secret).encrypt_update(np.zeros(size, np.float32)).tobytes()
        header = pb.UpdateHeader(
            client_id="a", round=h.round, base_version=h.model_version, num_examples=10,
            encoding="he-ckks", manifest=h.manifest, total_bytes=len(good),
        )  # fmt: skip
        cases = {
            "garbage ciphertext": good[:4] + bytes(len(good) - 4),
            "truncated framing": good[:-100],
            "oversized length": b"\xff\xff\xff\x7f" + good[4:],
        }
        for what, payload in cases.items():
            header.total_bytes = len(payload)
            assert _submit(stub, header, payload) == grpc.StatusCode.INVALID_ARGUMENT, what
        plain = pb.UpdateHeader()
        plain.CopyFrom(header)
        plain.encoding, plain.total_bytes = "fp32", 4 * size
        code = _submit(stub, plain, bytes(4 * size))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # plaintext under --secure he
        header.total_bytes = len(good)
        assert _submit(stub, header, good) == grpc.StatusCode.OK  # still serving, still open
        ask = pb.EncryptedAggregateRequest(client_id="a", round=h.round)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.GetEncryptedAggregate(ask))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = status_json(tmp_path / "state")
    assert reply["rounds"] == []
