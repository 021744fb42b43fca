"""Transport security shared by both CLIs: TLS files, credentials, bearer tokens in metadata.

One way to open a channel (`open_channel`) and one set of flags (`add_tls_arguments`) serve the
client, `fedserver status --server` and `fedserver health`, so they all speak the same TLS.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedcore.wire import CHANNEL_OPTIONS

log = logging.getLogger("fedcore.security")

TOKEN_METADATA = "authorization"
TOKEN_SCHEME = "Bearer "


class SecurityError(ValueError):
    """Bad TLS or token settings, with what to change."""


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read {what} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: our certificate and key, and the CA that signs the peer's certificate."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TlsFiles | None:
        files = cls(args.tls_cert, args.tls_key, args.tls_ca)
        if (files.cert is None) != (files.key is None):
            raise SecurityError("--tls-cert and --tls-key go together: give both or neither")
        return None if files == cls() else files

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise SecurityError(
                "a TLS coordinator needs --tls-cert and --tls-key (create them with "
                "`fedserver certs`); --tls-ca alone only applies to clients"
            )
        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        if self.ca is None:
            return grpc.ssl_server_credentials([pair])
        # mTLS: the handshake itself refuses clients without a certificate from this CA.
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(self.ca, "CA certificate"), require_client_auth=True
        )

    def certificate_name(self) -> str:
        """The common name of our certificate: the client id a coordinator will see."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        assert self.cert is not None
        try:
            cert = x509.load_pem_x509_certificate(_read(self.cert, "TLS certificate"))
        except ValueError as e:
            raise SecurityError(f"{self.cert} is not a PEM certificate: {e}") from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA certificate") if self.ca else None,
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
        )


def add_tls_arguments(parser: argparse.ArgumentParser, *, server: bool) -> None:
    group = parser.add_argument_group("security")
    if server:
        group.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
        group.add_argument("--tls-key", type=Path, help="server private key (PEM)")
        group.add_argument(
            "--tls-ca",
            type=Path,
            help="CA that signs client certificates; requires them (mTLS)",
        )
        return
    group.add_argument(
        "--tls-ca",
        type=Path,
        help="CA that signed the coordinator's certificate; enables TLS",
    )
    group.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), for mTLS")
    group.add_argument("--tls-key", type=Path, help="this client's private key (PEM)")
    group.add_argument(
        "--token",
        help="bearer token from `fedserver tokens add` (better: FEDGRPC_TOKEN in the environment)",
    )


def is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_FIELDS = ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")


class _Details(collections.namedtuple("_Details", _FIELDS), grpc.ClientCallDetails):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call on the channel."""

    def __init__(self, token: str) -> None:
        self._pair = (TOKEN_METADATA, TOKEN_SCHEME + token)

    def _details(self, d: Any) -> _Details:
        metadata = [*(d.metadata or ()), self._pair]
        return _Details(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(
    target: str,
    tls: TlsFiles | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
) -> grpc.Channel:
    """A channel to the coordinator: TLS when `tls` is given, the token on every call."""
    if tls is None:
        channel = grpc.insecure_channel(target, options=list(options))
        if not is_loopback(target):
            log.warning(
                "talking to %s in plaintext: anyone on the path can read and alter the model; "
                "pass --tls-ca (see docs/deploy.md)",
                target,
            )
    else:
        channel = grpc.secure_channel(target, tls.channel_credentials(), options=list(options))
    if token:
        if tls is None and not is_loopback(target):
            log.warning("sending a bearer token to %s without TLS", target)
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


__all__ = [
    "TOKEN_METADATA",
    "TOKEN_SCHEME",
    "SecurityError",
    "TlsFiles",
    "add_tls_arguments",
    "is_loopback",
    "open_channel",
]
