"""`fedserver certs`: a private CA, the coordinator's certificate and one per client.

Keys are ECDSA P-256 (fast to make, supported by every TLS stack gRPC uses). The client's
identity is its certificate's common name (also a SAN); its role (client or operator) is the
organizational unit, which the coordinator reads to decide what the peer may call.

Re-running is safe: an existing CA is reused and existing certificates are kept, so adding
clients (`--clients 5` after 3) only writes the new ones. `--force` starts over.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.files import PRIVATE, atomic_write

CA_NAME = "fedgrpc CA"
ROLE_CLIENT, ROLE_OPERATOR = "client", "operator"
OPERATOR_NAME = "operator"
_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "encipher_only",
    "decipher_only",
)
CA_DAYS, LEAF_DAYS = 3650, 825  # 825 days: the longest leaf lifetime browsers still accept


@dataclass
class CertPlan:
    out: Path
    server_names: Sequence[str]
    clients: Sequence[str]
    operator: bool = True
    force: bool = False
    written: list[Path] = field(default_factory=list)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, [pem], PRIVATE)  # private keys: owner only, before any byte lands


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, [cert.public_bytes(serialization.Encoding.PEM)], mode=0o644)


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgrpc")]
    if unit:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    parts.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(parts)


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _names(crt: Path) -> set[x509.GeneralName]:
    """The subject alternative names of an existing certificate file."""
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    name = _name(CA_NAME)
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                **dict.fromkeys(_USAGES, False),
                key_cert_sign=True,
                crl_sign=True,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    sans: Sequence[str],
    usage: x509.ObjectIdentifier,
    unit: str | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    builder = (
        _builder(_name(common_name, unit), ca_cert.subject, key.public_key(), LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_general_names(sans)), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _dns_safe(name: str) -> bool:
    return all(c.isalnum() or c in "-." for c in name) and 0 < len(name) <= 253


def make_certs(plan: CertPlan) -> list[Path]:
    """Write what is missing under plan.out; returns the files written."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    ca_key_path, ca_path = out / "ca.key", out / "ca.crt"
    if ca_path.exists() and ca_key_path.exists() and not plan.force:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path} is not a key made by `fedserver certs`")
        fresh_ca = False
    else:
        ca_key, ca_cert = _make_ca()
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_path, ca_cert)
        plan.written += [ca_key_path, ca_path]
        fresh_ca = True

    def leaf(
        stem: str, cn: str, sans: Sequence[str], usage: x509.ObjectIdentifier, unit: str | None
    ) -> None:
        crt, key = out / f"{stem}.crt", out / f"{stem}.key"
        kept = crt.exists() and key.exists() and not fresh_ca and not plan.force
        # Other --server-name values replace the server's pair (same CA: clients keep theirs),
        # the fix for a client told "the coordinator's certificate is for X, not Y".
        if kept and _names(crt) == set(_general_names(sans)):
            return
        k, c = _make_leaf(ca_key, ca_cert, cn, sans, usage, unit)
        _write_key(key, k)
        _write_cert(crt, c)
        plan.written += [key, crt]

    if plan.server_names:
        names = plan.server_names
        leaf("server", names[0], names, ExtendedKeyUsageOID.SERVER_AUTH, None)
    for client in plan.clients:
        if not _dns_safe(client):
            raise ValueError(
                f"client id {client!r}: use letters, digits, '-' and '.' (it becomes a "
                "certificate name)"
            )
        leaf(client, client, [client], ExtendedKeyUsageOID.CLIENT_AUTH, ROLE_CLIENT)
    if plan.operator:
        leaf(OPERATOR_NAME, OPERATOR_NAME, [], ExtendedKeyUsageOID.CLIENT_AUTH, ROLE_OPERATOR)
    return plan.written


def client_names(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def peer_role(pem: bytes) -> tuple[str, str]:
    """(common name, role) of a PEM certificate the TLS handshake already verified."""
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else "", str(ou[0].value) if ou else "")
