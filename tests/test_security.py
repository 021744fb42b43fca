"""A real coordinator with mTLS (certificates from `fedserver certs`) or with bearer tokens.

Refusals are checked against the exact gRPC status: a plaintext client and a client holding a
certificate from another CA never get past the handshake (UNAVAILABLE), missing or bad tokens
are UNAUTHENTICATED, and a valid identity acting as another client is PERMISSION_DENIED.
A full federation over mTLS with generated certificates (three clients, a coordinator restart)
is tests/test_compose_topology.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.security import TlsFiles, open_channel
from fedserver.security.certs import CertPlan, make_certs
from fedserver.security.tokens import add_token
from fedserver.transport.server import SERVICE_NAME
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    scrape,
    start_coordinator,
    wait_serving,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED_TLS = "WITHOUT CLIENT AUTHENTICATION"


@dataclass
class Live:
    port: int
    certs: Path
    state: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tls(self, name: str, certs: Path | None = None) -> TlsFiles:
        ca_dir = self.certs
        own = certs or self.certs
        return TlsFiles(own / f"{name}.crt", own / f"{name}.key", ca_dir / "ca.crt")


def _certs(out: Path, clients: int = 2) -> Path:
    make_certs(CertPlan(out, ["localhost", "127.0.0.1"], [f"client-{i}" for i in range(clients)]))
    return out


def _mtls_flags(certs: Path) -> list[str]:
    return ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
            "--tls-ca", str(certs / "ca.crt")]  # fmt: skip


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("mtls")
    certs = _certs(tmp / "certs")
    port = free_port()
    server = start_coordinator(
        tmp / "logs", port, tmp / "state", "--rounds", "2", "--min-clients", "3",
        *_mtls_flags(certs),
    )  # fmt: skip
    live = Live(port, certs, tmp / "state")
    try:
        wait_serving(port, server, tls=live.tls("operator"))
        yield live
    finally:
        server.kill()


def _join(channel: grpc.Channel, client_id: str) -> pb.JoinReply:
    return pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(client_id=client_id), timeout=10)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code()  # type: ignore[attr-defined]


def test_plaintext_client_is_refused_by_a_tls_coordinator(mtls: Live) -> None:
    with grpc.insecure_channel(mtls.target) as channel:
        assert _code(lambda: _join(channel, "client-0")) is grpc.StatusCode.UNAVAILABLE


def test_client_with_a_certificate_from_another_ca_is_refused(mtls: Live, tmp_path: Path) -> None:
    rogue = _certs(tmp_path / "rogue")
    # Trusts the real CA (so the server is verified) but presents a foreign client certificate.
    tls = TlsFiles(rogue / "client-0.crt", rogue / "client-0.key", mtls.certs / "ca.crt")
    with open_channel(mtls.target, tls) as channel:
        assert _code(lambda: _join(channel, "client-0")) is grpc.StatusCode.UNAVAILABLE
    # ...and a client without any certificate fails the handshake as well.
    with open_channel(mtls.target, TlsFiles(ca=mtls.certs / "ca.crt")) as channel:
        assert _code(lambda: _join(channel, "client-0")) is grpc.StatusCode.UNAVAILABLE


def test_certificate_holder_cannot_act_as_another_client(mtls: Live) -> None:
    with open_channel(mtls.target, mtls.tls("client-0")) as channel:
        assert _join(channel, "client-0").client_id == "client-0"
        assert _code(lambda: _join(channel, "client-1")) is DENIED
        stub = pb_grpc.CoordinatorStub(channel)
        pull = pb.GetGlobalModelRequest(client_id="client-1", wait_seconds=0)
        assert _code(lambda: list(stub.GetGlobalModel(pull, timeout=10))) is DENIED
        forged = iter([pb.UpdateChunk(header=pb.UpdateHeader(client_id="client-1", round=1))])
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitUpdate(forged, timeout=10)
        assert e.value.code() is DENIED  # type: ignore[attr-defined]
        assert "client-1" in e.value.details()  # type: ignore[attr-defined]


def test_operator_certificate_reads_status_but_cannot_train(mtls: Live) -> None:
    with open_channel(mtls.target, mtls.tls("operator")) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert status.total_rounds == 2
        assert _code(lambda: _join(channel, "operator")) is DENIED


def test_health_serving_and_reflection_over_mtls(mtls: Live) -> None:
    with open_channel(mtls.target, mtls.tls("operator")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_tokens_authenticate_and_bind_the_client_id(tmp_path: Path, procs: list[Proc]) -> None:
    certs = _certs(tmp_path / "certs", clients=0)
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "client-0")
    port, metrics_port = free_port(), free_port()
    # Server-side TLS only (no --tls-ca): clients are identified by their tokens.
    server = start_coordinator(
        tmp_path / "logs", port, tmp_path / "state", "--rounds", "1", "--min-clients", "2",
        "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
        "--tokens", str(tokens), "--metrics-port", str(metrics_port),
    )  # fmt: skip
    procs.append(server)
    ca_only = TlsFiles(ca=certs / "ca.crt")
    wait_serving(port, server, tls=ca_only)  # health needs no token
    target = f"127.0.0.1:{port}"
    with open_channel(target, ca_only) as channel:
        assert _code(lambda: _join(channel, "client-0")) is grpc.StatusCode.UNAUTHENTICATED
    with open_channel(target, ca_only, token="fgt_not-a-real-token") as channel:
        assert _code(lambda: _join(channel, "client-0")) is grpc.StatusCode.UNAUTHENTICATED
    with open_channel(target, ca_only, token=token) as channel:
        assert _join(channel, "client-0").client_id == "client-0"
        assert _code(lambda: _join(channel, "client-1")) is DENIED
        stub = pb_grpc.CoordinatorStub(channel)
        forged = iter([pb.UpdateChunk(header=pb.UpdateHeader(client_id="client-1", round=1))])
        assert _code(lambda: stub.SubmitUpdate(forged, timeout=10)) is DENIED
    assert UNAUTHENTICATED_TLS not in server.log()  # tokens authenticate: no warning
    refused = scrape(metrics_port)
    name = 'fedgrpc_auth_refused_total{code="%s",method="%s"}'
    assert refused[name % ("UNAUTHENTICATED", "Join")] == 2
    assert refused[name % ("PERMISSION_DENIED", "Join")] == 1
    assert refused[name % ("PERMISSION_DENIED", "SubmitUpdate")] == 1


def test_health_and_live_status_commands_use_the_operator_certificate(mtls: Live) -> None:
    certs = mtls.certs
    flags = ["--server", mtls.target, "--tls-ca", str(certs / "ca.crt"), "--tls-cert",
             str(certs / "operator.crt"), "--tls-key", str(certs / "operator.key")]  # fmt: skip
    health = fedserver("health", *flags)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr
    status = fedserver("status", *flags, "--json")
    assert json.loads(status.stdout)["total_rounds"] == 2, status.stderr
    plaintext = fedserver("health", "--server", mtls.target, "--timeout", "2")
    assert plaintext.returncode == 1


def test_operator_cannot_act_as_an_he_client(tmp_path: Path, procs: list[Proc]) -> None:
    """Under --secure he the operator certificate gets PERMISSION_DENIED for the key holder's
    RPCs and never becomes a live client (which would get it selected, stall the round, and
    maybe make it the key holder); nor does a client acting as another or asking for a
    decryption it was not given."""
    pytest.importorskip("tenseal")
    from fedcore.he import generate_keys
    from fedcore.wire import update_stream

    _, public = generate_keys(tmp_path / "keys")
    certs = _certs(tmp_path / "certs")
    port = free_port()
    server = start_coordinator(
        tmp_path / "logs", port, tmp_path / "state", "--rounds", "1", "--min-clients", "2",
        "--secure", "he", "--he-public-key", str(public), *_mtls_flags(certs),
    )  # fmt: skip
    procs.append(server)
    live = Live(port, certs, tmp_path / "state")
    wait_serving(port, server, tls=live.tls("operator"))

    def live_clients() -> int:
        with open_channel(live.target, live.tls("operator")) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            return stub.GetStatus(pb.GetStatusRequest(), timeout=10).live_clients

    def he_calls(channel: grpc.Channel, client_id: str) -> list[grpc.StatusCode]:
        stub = pb_grpc.CoordinatorStub(channel)
        ask = pb.EncryptedAggregateRequest(client_id=client_id, round=1)
        header = pb.UpdateHeader(client_id=client_id, round=1, encoding="fp32", total_bytes=4)
        payload = np.zeros(4, np.uint8)
        stream = update_stream(header, payload, hashlib.sha256(payload).hexdigest())
        return [
            _code(lambda: list(stub.GetEncryptedAggregate(ask, timeout=10))),
            _code(lambda: stub.SubmitDecryption(stream, timeout=10)),
        ]

    with open_channel(live.target, live.tls("operator")) as channel:
        assert he_calls(channel, "operator") == [DENIED, DENIED]
    with open_channel(live.target, live.tls("client-0")) as channel:
        assert he_calls(channel, "client-1") == [DENIED, DENIED]
        assert _code(lambda: _join(channel, "client-1")) is DENIED
        # Its own id, but nothing is being decrypted: refused by the handler, still not live.
        precondition = grpc.StatusCode.FAILED_PRECONDITION
        assert he_calls(channel, "client-0") == [precondition, precondition]
        assert live_clients() == 0
        assert _join(channel, "client-0").client_id == "client-0"
    assert live_clients() == 1  # GetStatus does show a client that passed every check


def test_tls_without_client_authentication_warns_loudly(tmp_path: Path, procs: list[Proc]) -> None:
    certs = _certs(tmp_path / "certs", clients=0)
    port = free_port()
    # Server-side TLS, no --tls-ca and no --tokens: encrypted, but open to anyone.
    server = start_coordinator(
        tmp_path / "logs", port, tmp_path / "state", "--rounds", "1", "--min-clients", "2",
        "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
    )  # fmt: skip
    procs.append(server)
    ca_only = TlsFiles(ca=certs / "ca.crt")
    wait_serving(port, server, tls=ca_only)
    # The warning is true: a caller with no identity at all joins as whoever it claims to be.
    with open_channel(f"127.0.0.1:{port}", ca_only) as channel:
        assert _join(channel, "anyone").client_id == "anyone"
    wait_until(lambda: UNAUTHENTICATED_TLS in server.log(), 30, "the start-up warning")
    line = next(x for x in server.log().splitlines() if UNAUTHENTICATED_TLS in x)
    assert "WARNING" in line and "--tls-ca" in line and "--tokens" in line, line
