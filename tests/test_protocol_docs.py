"""docs/protocol.md is what a client author can trust: its recipes and tables match the code.

The model-version and update-checksum recipes are recomputed from the docs alone (the docs'
Python snippet, and the prose rebuilt by hand) with blake3/hashlib/json on raw bytes taken off a
real coordinator, never through fedcore's hashing. Every rejection reason the coordinator can
emit is documented, with the status code the servicer really answers.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import blake3
import grpc
import numpy as np
import pytest
import xxhash

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, Manifest, TensorSpec
from fedserver.protocols.secagg_stages import SecAggRefused
from fedserver.rounds.synchronous import AlreadySubmitted, NotSelected, StaleRound
from fedserver.transport.rpc import status_for
from fedserver.updates.messages import BaseVersionMismatch, TooManyStreams
from fedserver.updates.receiver import BadUpdate, UpdateTooLarge
from tests.raw_client import lone_client, update_header

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
CHUNK = 1 << 20


def _section(title: str) -> str:
    return PROTOCOL.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _docs_snippet_version(manifest: pb.Manifest, model_bytes: bytes) -> str:
    """Run the Python block of docs/protocol.md "Model version" as written."""
    (code,) = re.findall(r"```python\n(.*?)```", _section("Model version"), re.S)
    code = code.replace("assert h.hexdigest() == header.model_version", "version = h.hexdigest()")
    scope = {"blake3": blake3, "json": json, "header": pb.ModelHeader(manifest=manifest)}
    scope["model_bytes"] = model_bytes
    exec(code, scope)
    return str(scope["version"])


def _prose_version(tensors: list[tuple[str, str, list[int]]], model_bytes: bytes) -> str:
    """The prose recipe, built by hand (ASCII names without escapes): keys dtype, name, shape;
    no whitespace; then the bytes."""
    objects = [
        f'{{"dtype":"{dtype}","name":"{name}","shape":[{",".join(map(str, shape))}]}}'
        for name, dtype, shape in tensors
    ]
    h = blake3.blake3(("[" + ",".join(objects) + "]").encode("ascii"))
    h.update(model_bytes)
    return h.hexdigest()


def test_documented_example_manifest_json_matches_the_prose() -> None:
    example = re.search(r"the JSON is\n`(\[.*?\])`", _section("Model version"))
    assert example is not None
    built = _prose_version([("0.weight", "float32", [64, 64]), ("0.bias", "float32", [64])], b"")
    assert blake3.blake3(example.group(1).encode()).hexdigest() == built


def test_model_version_recipe_matches_a_flat_model_of_every_dtype() -> None:
    rng = np.random.default_rng(0)
    specs = [
        TensorSpec(name, dtype, shape)
        for name, dtype, shape in [
            ("w", "float32", (3, 2)), ("h", "float16", (4,)), ("b", "bfloat16", (2, 2)),
            ("d", "float64", ()), ("steps", "int64", ()), ("i32", "int32", (1,)),
            ("i16", "int16", (2,)), ("q", "int8", (3,)), ("u", "uint8", (5,)),
            ("mask", "bool", (2, 1)), ("poids-été \"q\"", "float32", (0, 3)),
        ]
    ]  # fmt: skip
    manifest = Manifest(tuple(specs))
    model = FlatModel(manifest, rng.integers(0, 256, manifest.total_bytes, dtype=np.uint8))
    wire = pb.Manifest(
        tensors=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in specs]
    )
    raw = model.buffer.tobytes()
    assert _docs_snippet_version(wire, raw) == model.version
    # The prose, built by hand, for the names that need no JSON escaping.
    ascii_manifest = Manifest(tuple(specs[:-1]))
    plain = FlatModel(ascii_manifest, model.buffer[: ascii_manifest.total_bytes].copy())
    tensors = [(t.name, t.dtype, list(t.shape)) for t in ascii_manifest.tensors]
    assert _prose_version(tensors, plain.buffer.tobytes()) == plain.version


def _raw_pull(stub: pb_grpc.CoordinatorStub, client_id: str) -> tuple[pb.ModelHeader, bytes]:
    request = pb.GetGlobalModelRequest(client_id=client_id, known_version="", wait_seconds=10)
    messages = list(stub.GetGlobalModel(request, timeout=30))
    return messages[0].header, b"".join(m.data for m in messages[1:])


def _upload(header: pb.UpdateHeader, payload: bytes, trailer: pb.UpdateTrailer):  # type: ignore[no-untyped-def]
    yield pb.UpdateChunk(header=header)
    for at in range(0, len(payload), CHUNK):
        yield pb.UpdateChunk(data=payload[at : at + CHUNK])
    yield pb.UpdateChunk(trailer=trailer)


def _submit(stub: pb_grpc.CoordinatorStub, *args: object) -> tuple[grpc.StatusCode, bool]:
    try:
        reply = stub.SubmitUpdate(_upload(*args), timeout=30)  # type: ignore[arg-type]
    except grpc.RpcError as e:
        return e.code(), False  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, reply.duplicate


def test_version_and_checksum_recipes_match_a_real_coordinator(tmp_path: Path) -> None:
    with lone_client(tmp_path, "a", "--rounds", "2", "--round-timeout", "600") as joined:
        header, raw = _raw_pull(joined.stub, "a")
        assert header.selected and len(raw) == header.total_bytes > 0
        tensors = [(t.name, t.dtype, list(t.shape)) for t in header.manifest.tensors]
        assert _docs_snippet_version(header.manifest, raw) == header.model_version
        assert _prose_version(tensors, raw) == header.model_version
        assert re.fullmatch(r"[0-9a-f]{64}", header.model_version)
        assert header.model_checksum == "xxh3_128:" + xxhash.xxh3_128(raw).hexdigest()

        floats = [t for t in tensors if t[1] in ("float64", "float32", "float16", "bfloat16")]
        n = sum(int(np.prod(shape)) for _, _, shape in floats)
        delta = np.random.default_rng(0).normal(0, 1e-3, n).astype("<f4").tobytes()
        blake = blake3.blake3(delta).hexdigest()
        sha = hashlib.sha256(delta).hexdigest()
        model = joined.model
        as_blake3 = update_header("a", header.round, model, len(delta), checksum="blake3")
        as_sha256 = update_header("a", header.round, model, len(delta), checksum="sha256")
        wrong = blake3.blake3(delta + b"\0").hexdigest()
        stub = joined.stub
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        # A digest of anything but exactly the payload is refused...
        assert _submit(stub, as_blake3, delta, pb.UpdateTrailer(digest=wrong)) == (invalid, False)
        # ...the documented one is counted, and its retry acknowledged (upper case is fine).
        ok = _submit(stub, as_blake3, delta, pb.UpdateTrailer(digest=blake))
        assert ok == (grpc.StatusCode.OK, False)
        retry = _submit(stub, as_blake3, delta, pb.UpdateTrailer(digest=blake.upper()))
        assert retry == (grpc.StatusCode.OK, True)
        # sha256 goes in the `sha256` field: a right one reaches the duplicate check (another
        # algorithm's digest never equals the counted one), a wrong one does not.
        right = _submit(stub, as_sha256, delta, pb.UpdateTrailer(sha256=sha))
        assert right == (grpc.StatusCode.ALREADY_EXISTS, False)
        in_digest = _submit(stub, as_sha256, delta, pb.UpdateTrailer(digest=sha))
        assert in_digest == (invalid, False)
        # xxh3_128 (what fedclient sends when offered) in `digest`, as the recipe says.
        as_xxh3 = update_header("a", header.round, model, len(delta), checksum="xxh3_128")
        xxh = xxhash.xxh3_128(delta).hexdigest()
        wrong = xxhash.xxh3_128(delta + b"\0").hexdigest()
        assert _submit(stub, as_xxh3, delta, pb.UpdateTrailer(digest=wrong)) == (invalid, False)
        right = _submit(stub, as_xxh3, delta, pb.UpdateTrailer(digest=xxh))
        assert right == (grpc.StatusCode.ALREADY_EXISTS, False)


# ---------------------------------------------------------------- rejection reasons
def _emitted_reasons() -> set[str]:
    """Every reason string in fedserver/: `reason=` keywords and defaults, class attributes
    `reason = ...`, BadUpdate's positional reason, getattr(..., "reason", default)."""
    found: set[str] = set()

    def text(node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return None

    for path in (ROOT / "fedserver").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            candidates: list[ast.AST | None] = []
            if isinstance(node, ast.Call):
                candidates += [k.value for k in node.keywords if k.arg == "reason"]
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("BadUpdate", "UpdateTooLarge") and len(node.args) >= 2:
                    candidates.append(node.args[1])
                if name == "getattr" and len(node.args) == 3 and text(node.args[1]) == "reason":
                    candidates.append(node.args[2])
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(t, "id", "") == "reason" for t in targets):
                    candidates.append(node.value)
            elif isinstance(node, ast.arguments):
                named = [*node.posonlyargs, *node.args]
                defaults = dict(
                    zip(named[len(named) - len(node.defaults) :], node.defaults, strict=True)
                )
                candidates += [d for a, d in defaults.items() if a.arg == "reason"]
                candidates += [
                    d
                    for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)
                    if a.arg == "reason"
                ]
            found.update(r for r in map(text, candidates) if r)
    return found


def _documented_reasons() -> dict[str, str]:
    """reason -> status column of docs/protocol.md's "Rejection reasons" table."""
    table = PROTOCOL.split("### Rejection reasons", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, re.M))


def test_every_rejection_reason_is_documented() -> None:
    emitted = _emitted_reasons()
    # the scan must see the ones the audit found missing, or it is not looking
    assert {"malformed", "bad_checksum", "checksum", "too_many_streams", "stale_base"} <= emitted
    undocumented = sorted(emitted - set(_documented_reasons()))
    assert not undocumented, f"add to docs/protocol.md 'Rejection reasons': {undocumented}"
    assert not set(_documented_reasons()) - emitted, "documented reasons the code never emits"


def test_documented_status_of_each_reason_is_what_the_servicer_answers() -> None:
    documented = _documented_reasons()
    refusals = [
        TooManyStreams("m"), UpdateTooLarge("m"), BadUpdate("m"), BadUpdate("m", "bad_checksum"),
        AlreadySubmitted("m", ""), NotSelected("m"), StaleRound("m"), BaseVersionMismatch("m"),
        SecAggRefused("m"),
    ]  # fmt: skip
    for e in refusals:
        assert documented[e.reason].split()[0] == status_for(e).name, e.reason
    refusals_table = _section("Refusals")
    in_flight = re.search(r"^\| a third upload [^|]*\| (\w+)", refusals_table, re.M)
    assert in_flight is not None and in_flight.group(1) == status_for(TooManyStreams("m")).name


def test_documented_retry_policy_is_the_reference_clients() -> None:
    from fedclient.retry import RETRYABLE

    policy = _section(
        "The reference client's retry policy (`fedclient/retry.py`, `fedclient/session.py`)"
    )
    retried = re.search(r"\*\*Retried:\*\* ([A-Z_, \n]+?) —", policy)
    assert retried is not None
    names = {n.strip() for n in retried.group(1).replace("\n", " ").split(",")}
    assert names == {c.name for c in RETRYABLE}
