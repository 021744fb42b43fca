"""Certificates, token files and the authorization rules, without a server."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.proto import coordinator_pb2 as pb
from fedserver.cli import main as fedserver_main
from fedserver.security.certs import CertPlan, make_certs, peer_role
from fedserver.security.tokens import TokenStore, add_token, revoke_token
from fedserver.transport.auth import Authenticator, Denied, Identity, claimed_client_id

pytestmark = pytest.mark.timeout(60)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_command_writes_ca_server_and_client_certificates(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    code = fedserver_main(
        ["certs", "--out", str(out), "--server-name", "coord.example.org",
         "--server-name", "10.0.0.5", "--clients", "2"]
    )  # fmt: skip
    assert code == 0
    ca = _cert(out / "ca.crt")
    server = _cert(out / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in ("client-0", "client-1"):
        cert = _cert(out / f"{name}.crt")
        assert cert.issuer == ca.subject
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == name
        assert peer_role((out / f"{name}.crt").read_bytes()) == (name, "client")
        cert.verify_directly_issued_by(ca)
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
    assert peer_role((out / "operator.crt").read_bytes()) == ("operator", "operator")
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600


def test_certs_rerun_keeps_existing_files_and_adds_new_clients(tmp_path: Path) -> None:
    plan = CertPlan(tmp_path, ["localhost"], ["client-0"])
    first = make_certs(plan)
    before = (tmp_path / "client-0.crt").read_bytes()
    written = make_certs(CertPlan(tmp_path, ["localhost"], ["client-0", "client-1"]))
    assert (tmp_path / "client-0.crt").read_bytes() == before
    assert sorted(p.name for p in written) == ["client-1.crt", "client-1.key"]
    assert len(first) == 8  # ca, server, client-0, operator: cert + key each
    forced = make_certs(CertPlan(tmp_path, ["localhost"], ["client-0"], force=True))
    assert len(forced) == 8 and (tmp_path / "client-0.crt").read_bytes() != before


def test_certs_rerun_with_other_server_names_replaces_only_the_server_pair(
    tmp_path: Path,
) -> None:
    """What a client told "the coordinator's certificate is for 127.0.0.1, not localhost" is
    asked to do: re-run with the name; clients keep their certificates (same CA)."""
    make_certs(CertPlan(tmp_path, ["127.0.0.1"], ["client-0"]))
    client = (tmp_path / "client-0.crt").read_bytes()
    written = make_certs(CertPlan(tmp_path, ["127.0.0.1", "localhost"], ["client-0"]))
    assert sorted(p.name for p in written) == ["server.crt", "server.key"]
    server = _cert(tmp_path / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    server.verify_directly_issued_by(_cert(tmp_path / "ca.crt"))
    assert (tmp_path / "client-0.crt").read_bytes() == client
    assert make_certs(CertPlan(tmp_path, ["127.0.0.1", "localhost"], ["client-0"])) == []


def test_certs_refuse_client_ids_that_cannot_be_certificate_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="client id 'bad id'"):
        make_certs(CertPlan(tmp_path, ["localhost"], ["bad id"]))


def test_tokens_are_stored_hashed_and_can_be_rotated_and_revoked(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = add_token(path, "client-0")
    store = TokenStore(path)
    assert token not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = store.lookup(token)
    assert entry is not None and (entry.name, entry.role) == ("client-0", "client")
    assert store.lookup(token + "x") is None
    rotated = add_token(path, "client-0")
    assert store.lookup(token) is None and store.lookup(rotated) is not None
    assert revoke_token(path, "client-0")
    assert store.lookup(rotated) is None
    assert json.loads(path.read_text())["tokens"] == []


def test_tokens_cli_prints_the_token_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fedserver_main(["tokens", "add", "client-7", "--state-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenStore(tmp_path / "tokens.json").lookup(token) is not None
    assert fedserver_main(["tokens", "revoke", "nobody", "--state-dir", str(tmp_path)]) == 1


def test_a_client_can_only_act_as_itself() -> None:
    auth = Authenticator(mtls=True, tokens=None)
    me = Identity("client-0", "client", "certificate")
    auth.authorize(me, "Join", pb.JoinRequest(client_id="client-0"))
    with pytest.raises(Denied) as e:
        auth.authorize(me, "Join", pb.JoinRequest(client_id="client-1"))
    assert e.value.code is grpc.StatusCode.PERMISSION_DENIED
    header = pb.UpdateChunk(header=pb.UpdateHeader(client_id="client-1"))
    assert claimed_client_id(header) == "client-1"
    assert claimed_client_id(pb.UpdateChunk(data=b"x")) is None
    with pytest.raises(Denied):
        auth.authorize(me, "SubmitUpdate", header)
    operator = Identity("operator", "operator", "certificate")
    auth.authorize(operator, "GetStatus", pb.GetStatusRequest())
    with pytest.raises(Denied, match="only clients"):
        auth.authorize(operator, "GetGlobalModel", None)


def test_missing_or_wrong_credentials_are_unauthenticated(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = add_token(path, "client-0")
    auth = Authenticator(mtls=False, tokens=TokenStore(path))
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(Denied) as e:
            auth.identify(metadata, {})
        assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
    who = auth.identify((("authorization", f"Bearer {token}"),), {})
    assert who == Identity("client-0", "client", "token")
    with pytest.raises(Denied) as e:
        Authenticator(mtls=True, tokens=None).identify((), {})
    assert e.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_security_flags_come_from_env_and_toml_like_every_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedclient import cli as client_cli
    from fedcore.config import parse_layered
    from fedserver import cli as server_cli

    config = tmp_path / "fed.toml"
    config.write_text(
        '[server]\ntask = "examples.digits:task"\ntls-cert = "s.crt"\ntls-key = "s.key"\n'
        'metrics-port = 9100\n[client]\ntls-ca = "ca.crt"\n'
    )
    monkeypatch.setenv("FEDGRPC_TOKEN", "fgt_from_env")
    monkeypatch.setenv("FEDGRPC_TLS_KEY", "env.key")
    args = parse_layered(
        server_cli.build_parser(),
        ["run", "--config", str(config), "--tls-key", "flag.key"],
        "server",
    )
    assert (args.tls_cert, args.tls_key, args.metrics_port) == (
        Path("s.crt"),
        Path("flag.key"),
        9100,
    )
    client = parse_layered(
        client_cli.build_parser(),
        ["run", "--config", str(config), "--server", "h:1", "--task", "m:t"],
        "client",
    )
    assert (client.tls_ca, client.tls_key, client.token) == (
        Path("ca.crt"), Path("env.key"), "fgt_from_env",
    )  # fmt: skip
    # The same [server] table serves `status` and `report`: run's keys are skipped there...
    status = parse_layered(server_cli.build_parser(), ["status", "--config", str(config)], "server")
    assert status.command == "status"
    # ...but a key no subcommand knows is still an error naming it.
    config.write_text('[server]\ntls-cetr = "typo"\n')
    with pytest.raises(SystemExit):
        parse_layered(server_cli.build_parser(), ["run", "--config", str(config)], "server")


def test_client_id_defaults_to_the_certificate_name(tmp_path: Path) -> None:
    from fedcore.security import TlsFiles

    make_certs(CertPlan(tmp_path, ["localhost"], ["site-a"]))
    tls = TlsFiles(tmp_path / "site-a.crt", tmp_path / "site-a.key", tmp_path / "ca.crt")
    assert tls.certificate_name() == "site-a"
