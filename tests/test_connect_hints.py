"""A client whose TLS settings can never work with its coordinator says what to change and
exits at once (status 2), instead of retrying quietly for --give-up-after (300 s); the
coordinator's log stays free of gRPC's own handshake lines. An unreachable coordinator is
reported with its address every few seconds until the client gives up."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedclient.connect_hints import connect_failure, permanent_hint
from fedcore.security import TlsFiles
from fedserver.security.certs import CertPlan, make_certs
from tests.procs import Proc, free_port, start_client, start_coordinator, wait_serving

pytestmark = pytest.mark.timeout(180)
# Far below the default --give-up-after of 300 s that every client here runs with.
EXITS_WITHIN = 60


@dataclass
class Live:
    port: int
    certs: Path
    rogue: Path
    server: Proc


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A coordinator requiring client certificates; its certificate names 127.0.0.1 only."""
    tmp = tmp_path_factory.mktemp("hints")
    certs, rogue = tmp / "certs", tmp / "rogue"
    make_certs(CertPlan(certs, ["127.0.0.1"], ["client-0"]))
    make_certs(CertPlan(rogue, ["127.0.0.1"], ["client-0"]))
    port = free_port()
    flags = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
             "--tls-ca", str(certs / "ca.crt"), "--min-clients", "2"]  # fmt: skip
    server = start_coordinator(tmp / "logs", port, tmp / "state", *flags)
    try:
        operator = TlsFiles(certs / "operator.crt", certs / "operator.key", certs / "ca.crt")
        wait_serving(port, server, tls=operator)
        yield Live(port, certs, rogue, server)
    finally:
        server.kill()


def _client(
    tmp_path: Path, procs: list[Proc], port: int, *tls: str, host: str = "127.0.0.1"
) -> Proc:
    client = start_client(
        tmp_path, port, "0/1", "--give-up-after", "300", *tls, name="client", host=host
    )
    procs.append(client)
    return client


def _files(certs: Path, ca: Path | None = None, name: str = "client-0") -> list[str]:
    return ["--tls-ca", str(ca or certs / "ca.crt"), "--tls-cert", str(certs / f"{name}.crt"),
            "--tls-key", str(certs / f"{name}.key")]  # fmt: skip


def _gives_up_with(client: Proc, hint: str) -> None:
    assert client.wait(EXITS_WITHIN) == 2, client.log()
    log = client.log()
    assert hint in log, log
    assert "ssl_transport_security" not in log, log  # gRPC's own lines stay out of ours


@pytest.mark.integration
def test_plaintext_client_is_told_to_use_tls(mtls: Live, tmp_path: Path, procs: list[Proc]) -> None:
    client = _client(tmp_path, procs, mtls.port)
    _gives_up_with(client, f"the coordinator at 127.0.0.1:{mtls.port} requires TLS: pass --tls-ca")
    # The refused handshakes left no raw gRPC lines in the coordinator's log either.
    assert "Handshake failed" not in mtls.server.log(), mtls.server.log()


@pytest.mark.integration
def test_client_without_a_certificate_is_told_to_pass_one(
    mtls: Live, tmp_path: Path, procs: list[Proc]
) -> None:
    client = _client(tmp_path, procs, mtls.port, "--tls-ca", str(mtls.certs / "ca.crt"))
    _gives_up_with(client, "requires a client certificate (mTLS): pass --tls-cert/--tls-key")


@pytest.mark.integration
def test_certificate_name_mismatch_names_the_certificate(
    mtls: Live, tmp_path: Path, procs: list[Proc]
) -> None:
    client = _client(tmp_path, procs, mtls.port, *_files(mtls.certs), host="localhost")
    _gives_up_with(
        client,
        "the coordinator's certificate is for 127.0.0.1, not localhost: use that name in "
        "--server, or re-run `fedserver certs --server-name localhost`",
    )


@pytest.mark.integration
def test_wrong_ca_is_named(mtls: Live, tmp_path: Path, procs: list[Proc]) -> None:
    rogue_ca = mtls.rogue / "ca.crt"
    client = _client(tmp_path, procs, mtls.port, *_files(mtls.certs, ca=rogue_ca))
    _gives_up_with(client, f"is not signed by --tls-ca {rogue_ca}")


@pytest.mark.integration
def test_certificate_from_another_ca_is_refused_with_a_hint(
    mtls: Live, tmp_path: Path, procs: list[Proc]
) -> None:
    rogue = _files(mtls.rogue, ca=mtls.certs / "ca.crt")
    client = _client(tmp_path, procs, mtls.port, *rogue)
    _gives_up_with(client, f"refused the certificate {mtls.rogue / 'client-0.crt'}")


def test_unreachable_coordinator_is_reported_every_few_seconds(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    # Reports come every 5 s (REPORT_EVERY) and attempts at least every 2 s
    # (UNREACHABLE_RETRY): 9 s leaves a 4 s window, two attempts wide, for the second report.
    client = start_client(tmp_path, port, "0/1", "--give-up-after", "9")
    procs.append(client)
    assert client.wait(60) == 1, client.log()
    log = client.log()
    said = f"coordinator 127.0.0.1:{port} unreachable (connection refused); retrying, "
    lines = [line for line in log.splitlines() if said in line]
    assert lines[0].endswith("retrying, 0 s so far"), log
    assert len(lines) >= 2, log  # again while it waited, not once and then silence
    assert f"coordinator at 127.0.0.1:{port} unreachable for 9s" in log


# grpc-python 1.85's UNAVAILABLE details, as recorded against real endpoints.
REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
    "Failed to connect to remote host: Connection refused"
)
NO_HOST = (
    "errors resolving nosuchhost.invalid:1: [field:hostname lookup error:address lookup failed "
    "for nosuchhost.invalid:1: Domain name not found]"
)
PLAINTEXT_PEER = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
    "OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)
CLOSED = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
)


@pytest.mark.parametrize(
    ("details", "reason"),
    [
        (REFUSED, "connection refused"),
        (NO_HOST, "no such host name"),
        (CLOSED, "connection closed by the coordinator"),
        ("too many uploads in flight; retry later", None),  # the coordinator answered
    ],
)
def test_connection_failures_get_a_short_reason(details: str, reason: str | None) -> None:
    assert connect_failure(details) == reason


def test_tls_client_against_a_plaintext_coordinator_is_told_so() -> None:
    hint = permanent_hint("127.0.0.1:1", TlsFiles(ca=Path("ca.crt")), PLAINTEXT_PEER)
    assert hint is not None and hint.startswith("the coordinator at 127.0.0.1:1 does not use TLS")


def test_closed_with_nothing_listening_is_retried() -> None:
    """ "Socket closed" with no TLS handshake possible: a restart, not a TLS mismatch."""
    assert permanent_hint(f"127.0.0.1:{free_port()}", None, CLOSED) is None
    assert permanent_hint("127.0.0.1:1", None, REFUSED) is None
