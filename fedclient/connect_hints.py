"""Why a client cannot reach its coordinator, and whether waiting could ever help.

gRPC reports every connection failure as UNAVAILABLE, whether the coordinator is restarting
(worth retrying) or the client's TLS settings can never work with it (not worth a second try).
The difference is in the details text of that first UNAVAILABLE; where the text is ambiguous
(a plaintext client and a TLS coordinator both see "Socket closed"), one TLS handshake of our
own asks the coordinator directly.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from pathlib import Path

from fedclient.retry import REPORT_EVERY, Misconfigured
from fedcore.security import TlsFiles

log = logging.getLogger("fedclient")

# Texts of grpc-python 1.85's connection failures (UNAVAILABLE details), checked against a
# real coordinator in tests/test_connect_hints.py.
CONNECT_FAILED = ("failed to connect to all addresses", "errors resolving", "DNS resolution")
REASONS = (
    ("Connection refused", "connection refused"),
    ("Domain name not found", "no such host name"),
    ("errors resolving", "host name not resolved"),
    ("Socket closed", "connection closed by the coordinator"),
    ("Connection reset", "connection reset"),
    ("Timeout occurred", "connection timed out"),
    ("No route to host", "no route to host"),
    ("Network is unreachable", "network unreachable"),
)
PROBE_TIMEOUT = 3.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Reachability:
    """Says that the coordinator is unreachable, with its address, every REPORT_EVERY seconds
    (not once and then silence); raises Misconfigured when waiting cannot help."""

    def __init__(self, target: str, tls: TlsFiles | None) -> None:
        self.target = target
        self.tls = tls
        self._reported = -REPORT_EVERY  # when it was last said (monotonic)

    def check(self, details: str | None, failing_since: float | None, joined: str) -> str | None:
        """The reason the last UNAVAILABLE call could not connect (None: the coordinator
        answered). `joined`: the federation id once a Join succeeded."""
        reason = connect_failure(details)
        if reason is None:
            return None
        # "Socket closed" also happens while a coordinator restarts: taken as a TLS mismatch
        # only before the first Join, when the settings have never worked.
        if not joined or "Socket closed" not in (details or ""):
            hint = permanent_hint(self.target, self.tls, details)
            if hint is not None:
                raise Misconfigured(hint)
        now = time.monotonic()
        if now - self._reported >= REPORT_EVERY:
            self._reported = now
            log.warning(
                "coordinator %s unreachable (%s); retrying, %.0f s so far",
                self.target,
                reason,
                now - (failing_since or now),
            )
        return reason


def connect_failure(details: str | None) -> str | None:
    """A short reason ("connection refused") when `details` describe a failure to connect at
    all, None when the coordinator answered (a refusal, a busy signal, a dropped stream)."""
    text = details or ""
    if not any(marker in text for marker in CONNECT_FAILED):
        return None
    for marker, reason in REASONS:
        if marker in text:
            return reason
    return "TLS handshake failed" if "handshake" in text.lower() else "cannot connect"


def permanent_hint(target: str, tls: TlsFiles | None, details: str | None) -> str | None:
    """What to change, when this connection failure is one that retrying cannot fix."""
    text = details or ""
    if "Hostname Verification Check failed" in text or "No match found for server name" in text:
        host = _host(target)
        names = _certificate_names(target)
        shown = ", ".join(names) if names else "another name"
        return (
            f"the coordinator's certificate is for {shown}, not {host}: use that name in "
            f"--server, or re-run `fedserver certs --server-name {host}` (with every other name "
            "clients dial; it replaces server.crt, same CA) and restart the coordinator"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        signer = f"--tls-ca {tls.ca}" if tls is not None and tls.ca else "the system's CAs"
        return (
            f"the coordinator's certificate at {target} is not signed by {signer}: pass "
            "--tls-ca with the ca.crt of the `fedserver certs` run that made it"
        )
    if tls is not None and "WRONG_VERSION_NUMBER" in text:
        return (
            f"the coordinator at {target} does not use TLS: drop --tls-ca/--tls-cert/--tls-key, "
            "or start the coordinator with --tls-cert/--tls-key"
        )
    if "Socket closed" not in text:
        return None
    # Closed during connection setup: a TLS coordinator hanging up on us, or just a restart?
    accepted = _tls_accepts(target, tls)
    if accepted is None:
        return None  # it does not speak TLS (or is gone): nothing we can say for sure
    if tls is None:
        return (
            f"the coordinator at {target} requires TLS: pass --tls-ca CA.crt (and "
            "--tls-cert/--tls-key if it asks for client certificates), made by `fedserver certs`"
        )
    if accepted:
        return None
    if tls.cert is None:
        return (
            f"the coordinator at {target} requires a client certificate (mTLS): pass "
            "--tls-cert/--tls-key (from `fedserver certs --clients N`)"
        )
    return (
        f"the coordinator at {target} refused the certificate {tls.cert}: it is not signed by "
        "the CA the coordinator trusts (its --tls-ca); use a certificate from the same "
        "`fedserver certs` run as the coordinator's"
    )


def _host(target: str) -> str:
    return target.rsplit(":", 1)[0].strip("[]")


def _address(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _handshake(
    target: str, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLSocket | None:
    """A TLS connection without verification (we only ask what the coordinator speaks)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
        raw = socket.create_connection(_address(target), timeout=PROBE_TIMEOUT)
    except (OSError, ValueError):
        return None
    try:
        return context.wrap_socket(raw, server_hostname=_host(target))
    except (OSError, ValueError):
        raw.close()
        return None


def _tls_accepts(target: str, tls: TlsFiles | None) -> bool | None:
    """None: no TLS handshake at `target`. Else whether it goes on to talk HTTP/2 with us (a
    coordinator requiring client certificates hangs up right after the handshake instead)."""
    conn = _handshake(target, *((tls.cert, tls.key) if tls is not None else (None, None)))
    if conn is None:
        return None
    with conn:
        try:
            conn.sendall(H2_PREFACE)
            return bool(conn.recv(9))  # the coordinator's SETTINGS frame, or a hang-up
        except OSError:
            return False


def _certificate_names(target: str) -> list[str]:
    """The DNS names and IP addresses the coordinator's certificate is for."""
    from cryptography import x509

    conn = _handshake(target)
    if conn is None:
        return []
    with conn:
        der = conn.getpeercert(binary_form=True)
    if not der:
        return []
    cert = x509.load_der_x509_certificate(der)
    with contextlib.suppress(x509.ExtensionNotFound):
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(n) for n in names.get_values_for_type(x509.DNSName)] + [
            str(ip) for ip in names.get_values_for_type(x509.IPAddress)
        ]
    return []
