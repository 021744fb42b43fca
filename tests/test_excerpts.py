"""Client input is quoted as one short excerpt (fedcore/limits.py `excerpt`, 64 characters),
wherever the coordinator echoes it: refusal messages and the log lines that carry them. A hostile
value far over its limit (a megabyte client id claimed past authentication, kilobyte tensor
names, 256-character encodings and checksums) never shows more than that."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcore.limits import MAX_EXCERPT, excerpt, excerpts
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.security import TlsFiles, open_channel
from fedcore.selection import Selection
from fedcore.tensors import Manifest, TensorSpec, float_vector
from fedcore.wire import manifest_to_proto, update_stream
from fedserver.rounds.synchronous import Phase, RoundMachine, RoundPolicy, SubmitRefused
from fedserver.security.certs import ROLE_CLIENT, CertPlan, make_certs
from fedserver.transport.auth import Authenticator, Denied, Identity
from fedserver.updates.messages import manifest_difference
from tests.procs import Proc, free_port, start_coordinator, wait_serving
from tests.raw_client import pull, update_header

LONG = 1024  # limits.MAX_TENSOR_NAME


def _long(ch: str, n: int = LONG) -> str:
    return ch * n


def _shows_at_most_an_excerpt(text: str, *values: str) -> None:
    for value in values:
        assert value[: MAX_EXCERPT + 1] not in text, f"{value[:8]}... quoted beyond an excerpt"


def test_excerpt_helpers_bound_what_they_quote() -> None:
    assert excerpt("short") == "'short'"
    shown = excerpt(_long("x", 10_000))
    assert len(shown) < MAX_EXCERPT + 30 and shown.endswith("(10000 characters)")
    listed = excerpts([_long(c) for c in "ABCDEFG"])
    _shows_at_most_an_excerpt(listed, *(_long(c) for c in "ABCDEFG"))
    assert listed.endswith("... (7 in all)]") and "'FFF" not in listed


def test_a_claimed_client_id_is_quoted_as_an_excerpt(caplog: pytest.LogCaptureFixture) -> None:
    me = Identity("client-0", ROLE_CLIENT, "certificate")
    claimed = _long("Q", 1 << 20)
    with pytest.raises(Denied, match="can only act as itself") as e:
        Authenticator(mtls=True, tokens=None).authorize(
            me, "Join", pb.JoinRequest(client_id=claimed)
        )
    _shows_at_most_an_excerpt(str(e.value), claimed)
    assert len(str(e.value)) < 300


def test_tensor_names_in_manifest_refusals_are_excerpts() -> None:
    want = Manifest([TensorSpec(f"{i}.weight", "float32", (2,)) for i in range(6)])
    names = [_long(c) for c in "ABCDEF"]
    got = Manifest([TensorSpec(n, "float32", (2,)) for n in names])
    message = manifest_difference(got, want)
    _shows_at_most_an_excerpt(message, *names)
    long_one = Manifest([TensorSpec(names[0], "float32", (3,))])
    for shape_or_dtype in (
        manifest_difference(long_one, Manifest([TensorSpec(names[0], "float32", (2,))])),
        manifest_difference(long_one, Manifest([TensorSpec(names[0], "float16", (3,))])),
    ):
        _shows_at_most_an_excerpt(shape_or_dtype, names[0])
    everything = Selection.everything(want)
    with pytest.raises(Exception, match="not trained this round") as outside:
        everything.subset(names)
    _shows_at_most_an_excerpt(str(outside.value), *names)


def test_a_long_client_id_in_a_round_refusal_is_an_excerpt() -> None:
    machine = RoundMachine(RoundPolicy(total_rounds=1, min_clients=1), clock=lambda: 0.0)
    machine.phase = Phase.COLLECTING  # round 1 open, nobody selected
    client = _long("K", 128)  # the longest valid client id
    with pytest.raises(SubmitRefused, match="is not selected") as e:
        machine.check_submit(client, 1)
    _shows_at_most_an_excerpt(str(e.value), client)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_hostile_long_values_never_show_beyond_an_excerpt(
    tmp_path: Path, procs: list[Proc]
) -> None:
    certs = tmp_path / "certs"
    make_certs(CertPlan(certs, ["localhost", "127.0.0.1"], ["client-0"]))
    port = free_port()
    server = start_coordinator(
        tmp_path / "logs", port, tmp_path / "state", "--rounds", "1",
        "--min-clients", "1", "--log-level", "debug",
        "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
        "--tls-ca", str(certs / "ca.crt"),
    )  # fmt: skip
    procs.append(server)
    wait_serving(
        port, server, tls=TlsFiles(certs / "operator.crt", certs / "operator.key", certs / "ca.crt")
    )
    me = TlsFiles(certs / "client-0.crt", certs / "client-0.key", certs / "ca.crt")
    hostile: list[str] = []
    details: list[str] = []

    def refused(call: object, code: grpc.StatusCode) -> None:
        with pytest.raises(grpc.RpcError) as e:
            call()  # type: ignore[operator]
        assert e.value.code() is code, e.value.details()  # type: ignore[attr-defined]
        details.append(e.value.details() or "")  # type: ignore[attr-defined]

    with open_channel(f"127.0.0.1:{port}", me) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        claimed = _long("Q", 1 << 20)
        hostile.append(claimed)
        refused(
            lambda: stub.Join(pb.JoinRequest(client_id=claimed), timeout=30),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        stub.Join(pb.JoinRequest(client_id="client-0"), timeout=10)
        header, model = pull(stub, "client-0", wait_seconds=20, timeout=60)
        assert header.selected and model is not None
        payload = np.zeros(float_vector(model).size, dtype="<f4").tobytes()
        digest = hashlib.sha256(payload).hexdigest()

        def submit(**overrides: object) -> None:
            h = update_header("client-0", header.round, model, len(payload), **overrides)
            stub.SubmitUpdate(update_stream(h, payload, digest), timeout=30)

        manifest = manifest_to_proto(model.manifest.floats().with_dtype("float32"))
        names = [_long(c) for c in "ABCDEF"[: len(manifest.tensors)]]
        for spec, name in zip(manifest.tensors, names, strict=True):
            spec.name = name
        hostile += names
        refused(lambda: submit(manifest=manifest), grpc.StatusCode.INVALID_ARGUMENT)
        for field, ch in (("encoding", "Z"), ("checksum", "C")):
            value = _long(ch, 256)
            hostile.append(value)
            refused(lambda f=field, v=value: submit(**{f: v}), grpc.StatusCode.INVALID_ARGUMENT)
        metric = _long("M", 1000)
        hostile.append(metric)
        refused(lambda: submit(metrics={metric: 1.0}), grpc.StatusCode.INVALID_ARGUMENT)
    assert len(details) == 1 + 1 + 2 + 1
    for text in details:
        _shows_at_most_an_excerpt(text, *hostile)
    server.kill()
    log = server.log()
    assert "acting as client 'QQQ" in log  # the refusal was logged, as an excerpt
    _shows_at_most_an_excerpt(log, *hostile)
