"""Bad updates against a live coordinator: exact status codes, model bytes untouched.

One coordinator process serves the whole module (min-clients 1, so this test is the only
selected client). The last test submits a valid update and checks the new global model equals
old + delta exactly, which proves none of the refused updates reached the accumulator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore import checksums
from fedcore.codecs import get_codec
from fedcore.files import read_safetensors
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, float_vector
from fedcore.wire import manifest_to_proto
from fedserver.state.history import read_status
from tests.procs import wait_until
from tests.raw_client import lone_client, pull, update_header

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
CLIENT = "tester"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Live:
    stub: pb_grpc.CoordinatorStub
    state: Path
    header: pb.ModelHeader
    model: FlatModel

    def model_file(self) -> bytes:
        return (self.state / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("bad_input")
    with lone_client(tmp, CLIENT, "--rounds", "3", "--round-timeout", "600") as joined:
        yield Live(joined.stub, tmp / "state", joined.header, joined.model)


def update(live: Live, payload: bytes, **overrides: object) -> pb.UpdateHeader:
    return update_header(CLIENT, live.header.round, live.model, len(payload), **overrides)


def stream(
    header: pb.UpdateHeader, payload: bytes, sha: str | None = None, trailer: bool = True
) -> Iterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=header)
    for i in range(0, len(payload), 4096):
        yield pb.UpdateChunk(data=payload[i : i + 4096])
    if trailer:
        digest = sha if sha is not None else hashlib.sha256(payload).hexdigest()
        yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest))


def delta_bytes(live: Live, value: float = 0.01) -> bytes:
    n = float_vector(live.model).size
    return np.full(n, value, dtype="<f4").tobytes()


def refused(live: Live, chunks: Iterator[pb.UpdateChunk]) -> tuple[grpc.StatusCode, str]:
    before = live.model_file()
    with pytest.raises(grpc.RpcError) as info:
        live.stub.SubmitUpdate(chunks, timeout=30)
    err = info.value
    # Nothing changed, and the daemon still answers.
    assert live.model_file() == before
    header, _ = pull(live.stub, CLIENT)
    assert header.model_version == live.model.version
    assert header.round == live.header.round
    return err.code(), err.details()  # type: ignore[attr-defined]


def test_future_round_is_failed_precondition(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload, round=live.header.round + 5), payload))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "has not started" in msg


def test_closed_round_is_failed_precondition(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload, round=0), payload))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "closed" in msg


def test_wrong_tensor_name(live: Live) -> None:
    payload = delta_bytes(live)
    manifest = manifest_to_proto(live.model.manifest.floats().with_dtype("float32"))
    manifest.tensors[0].name = "not.a.tensor"
    code, msg = refused(live, stream(update(live, payload, manifest=manifest), payload))
    assert code == INVALID and "not.a.tensor" in msg


def test_wrong_shape(live: Live) -> None:
    payload = delta_bytes(live)
    manifest = manifest_to_proto(live.model.manifest.floats().with_dtype("float32"))
    manifest.tensors[0].shape[0] += 1
    code, msg = refused(live, stream(update(live, payload, manifest=manifest), payload))
    assert code == INVALID and "shape" in msg


def test_wrong_dtype(live: Live) -> None:
    payload = delta_bytes(live)
    manifest = manifest_to_proto(live.model.manifest.floats().with_dtype("float64"))
    code, msg = refused(live, stream(update(live, payload, manifest=manifest), payload))
    assert code == INVALID and "float64" in msg


def test_unknown_dtype(live: Live) -> None:
    payload = delta_bytes(live)
    manifest = manifest_to_proto(live.model.manifest.floats().with_dtype("float32"))
    manifest.tensors[0].dtype = "complex128"
    code, msg = refused(live, stream(update(live, payload, manifest=manifest), payload))
    assert code == INVALID and "complex128" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(live: Live, bad: float) -> None:
    values = np.frombuffer(delta_bytes(live), dtype="<f4").copy()
    values[1234] = bad
    payload = values.tobytes()
    code, msg = refused(live, stream(update(live, payload), payload))
    assert code == INVALID and "NaN or Inf" in msg and "1234" in msg


@pytest.mark.parametrize("bad", [1e30, -3.4e38])
def test_a_finite_value_beyond_max_update_value_is_refused(live: Live, bad: float) -> None:
    # Finite, so it passed the NaN/Inf check; at 1e9 examples its weighted sum overflowed the
    # float32 aggregate and the round published an inf model (SCAFFOLD: an inf c).
    values = np.frombuffer(delta_bytes(live), dtype="<f4").copy()
    values[1234] = bad
    payload = values.tobytes()
    code, msg = refused(live, stream(update(live, payload, num_examples=10**9), payload))
    assert code == INVALID and "value 1234 is" in msg and "--max-update-value 1e+15" in msg


def test_bad_checksum(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload), payload, sha="0" * 64))
    assert code == INVALID and "checksum" in msg


def test_truncated_stream_missing_bytes(live: Live) -> None:
    payload = delta_bytes(live)
    header = update(live, payload)
    code, msg = refused(live, stream(header, payload[: len(payload) // 2]))
    assert code == INVALID and "truncated" in msg


def test_truncated_stream_missing_trailer(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload), payload, trailer=False))
    assert code == INVALID and "trailer" in msg


def test_declared_size_mismatch(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload, total_bytes=17), payload))
    assert code == INVALID and "bytes" in msg


def test_first_message_not_a_header(live: Live) -> None:
    chunks = iter([pb.UpdateChunk(data=b"\x00" * 16)])
    code, msg = refused(live, chunks)
    assert code == INVALID and "UpdateHeader" in msg


def test_zero_examples(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload, num_examples=0), payload))
    assert code == INVALID and "num_examples" in msg


def test_stale_base_version(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload, base_version="ab" * 32), payload))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "pull the model again" in msg


def test_unselected_client_is_permission_denied(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload, client_id="stranger"), payload))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not selected" in msg


def blake3_stream(header: pb.UpdateHeader, payload: bytes, digest: str) -> Iterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=header)
    yield pb.UpdateChunk(data=payload)
    yield pb.UpdateChunk(trailer=pb.UpdateTrailer(digest=digest))


def test_bad_blake3_checksum(live: Live) -> None:
    payload = delta_bytes(live)
    wrong = checksums.hexdigest("blake3", payload + b"x")
    header = update(live, payload, checksum="blake3")
    code, msg = refused(live, blake3_stream(header, payload, wrong))
    assert code == INVALID and "checksum mismatch" in msg


def test_blake3_digest_in_the_sha256_field_is_a_mismatch(live: Live) -> None:
    """The header's algorithm decides which trailer field is read; nothing is guessed."""
    payload = delta_bytes(live)
    digest = checksums.hexdigest("blake3", payload)
    code, msg = refused(live, stream(update(live, payload, checksum="blake3"), payload, digest))
    assert code == INVALID and "checksum mismatch" in msg


def test_unknown_checksum_algorithm(live: Live) -> None:
    payload = delta_bytes(live)
    code, msg = refused(live, stream(update(live, payload, checksum="md5"), payload))
    assert code == INVALID and "unknown update checksum 'md5'" in msg and "blake3" in msg


@pytest.mark.parametrize("scale", [np.nan, np.inf, -1.0])
def test_int4_bad_block_scale(live: Live, scale: float) -> None:
    codec = get_codec("int4")
    floats = live.model.manifest.floats()
    payload = codec.encode(np.full(float_vector(live.model).size, 0.01, dtype=np.float32))
    payload[4:8] = np.frombuffer(np.array([scale], dtype="<f4").tobytes(), dtype=np.uint8)
    header = update(
        live,
        payload.tobytes(),
        encoding="int4",
        manifest=manifest_to_proto(codec.wire_manifest(floats)),
    )
    code, msg = refused(live, stream(header, payload.tobytes()))
    assert code == INVALID and "int4 block scales must be finite and >= 0" in msg


def test_int4_truncated_and_oversized(live: Live) -> None:
    codec = get_codec("int4")
    floats = live.model.manifest.floats()
    payload = codec.encode(np.full(float_vector(live.model).size, 0.01)).tobytes()
    manifest = manifest_to_proto(codec.wire_manifest(floats))
    header = update(live, payload, encoding="int4", manifest=manifest)
    code, msg = refused(live, stream(header, payload[:-3]))
    assert code == INVALID and "truncated" in msg
    code, msg = refused(live, stream(header, payload + b"\x88"))  # more than declared
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds" in msg
    wrong = update(live, payload + b"\x88", encoding="int4", manifest=manifest)
    code, msg = refused(live, stream(wrong, payload + b"\x88"))
    assert code == INVALID and "int4 update of this model has" in msg


def test_valid_update_after_all_refusals_is_exact(live: Live) -> None:
    """The accumulator held nothing from the refused updates: new model == old + delta."""
    payload = delta_bytes(live, 0.25)
    reply = live.stub.SubmitUpdate(stream(update(live, payload), payload), timeout=30)
    assert reply.accepted and not reply.duplicate
    # A byte-identical retry is acknowledged as a duplicate (or, once the round closed, still
    # recognized from the history) and never counted twice.
    retry = live.stub.SubmitUpdate(stream(update(live, payload), payload), timeout=30)
    assert retry.accepted and retry.duplicate

    header, new_model = pull(live.stub, CLIENT)
    assert header.round == live.header.round + 1 and new_model is not None
    expected = float_vector(live.model) + np.float32(0.25)
    assert float_vector(new_model).tobytes() == expected.tobytes()
    # The round is committed, and model.safetensors written after the commit (architecture.md,
    # "Commit order"), while the next one runs.
    committed = live.header.round
    wait_until(lambda: read_status(live.state)["rounds_completed"] >= committed, 60, "the commit")

    def published() -> bool:
        on_disk, _ = read_safetensors(live.state / "model.safetensors")
        return on_disk.buffer.tobytes() == new_model.buffer.tobytes()

    wait_until(published, 60, "model.safetensors to hold the new model")

    different = delta_bytes(live, 0.5)
    with pytest.raises(grpc.RpcError) as info:
        live.stub.SubmitUpdate(stream(update(live, different), different), timeout=30)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
