"""Authorization is one explicit table (fedserver/transport/auth.py ACCESS) that every Coordinator
RPC goes through, and a refused caller never becomes a live client.

The table must name every RPC of the service (read from the protobuf descriptor, so a new RPC
without an entry fails here), a method without an entry is refused even when authentication is
off, and docs/security.md shows the same table. Liveness: the secure-aggregation and HE handlers
mark a caller live only after all their own checks passed (the servicer's side of the same rule
is tests/test_security.py::test_operator_cannot_act_as_an_he_client).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest

from fedcore.proto import coordinator_pb2 as pb
from fedserver.rounds.synchronous import RoundPolicy, SubmitRefused
from fedserver.security.certs import ROLE_CLIENT, ROLE_OPERATOR
from fedserver.transport.auth import (
    ACCESS,
    CLIENTS,
    SERVICE_PREFIX,
    Authenticator,
    AuthInterceptor,
    Denied,
    Identity,
)
from fedserver.updates.receiver import BadUpdate

pytestmark = pytest.mark.timeout(60)
DOCS = Path(__file__).resolve().parents[1] / "docs"
COORDINATOR_RPCS = [m.name for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods]


def test_every_coordinator_rpc_has_an_authorization_entry() -> None:
    assert len(COORDINATOR_RPCS) >= 11
    missing = [m for m in COORDINATOR_RPCS if m not in ACCESS]
    assert not missing, f"add these RPCs to fedserver/transport/auth.py ACCESS: {missing}"
    stale = sorted(set(ACCESS) - set(COORDINATOR_RPCS))
    assert not stale, f"ACCESS names RPCs the proto does not have: {stale}"
    assert all(roles <= {ROLE_CLIENT, ROLE_OPERATOR} and roles for roles in ACCESS.values())


@pytest.mark.parametrize("method", COORDINATOR_RPCS)
def test_operator_may_only_read_status(method: str) -> None:
    auth = Authenticator(mtls=True, tokens=None)
    operator = Identity("operator", ROLE_OPERATOR, "certificate")
    client = Identity("client-0", ROLE_CLIENT, "certificate")
    auth.authorize(client, method, None)
    if method == "GetStatus":
        auth.authorize(operator, method, None)
        return
    assert ACCESS[method] == CLIENTS
    with pytest.raises(Denied, match="only clients") as e:
        auth.authorize(operator, method, None)
    assert e.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_he_requests_must_name_the_caller() -> None:
    auth = Authenticator(mtls=True, tokens=None)
    me = Identity("client-0", ROLE_CLIENT, "token")
    ask = pb.EncryptedAggregateRequest(client_id="client-1", round=1)
    with pytest.raises(Denied, match="can only act as itself"):
        auth.authorize(me, "GetEncryptedAggregate", ask)
    decryption = pb.UpdateChunk(header=pb.UpdateHeader(client_id="client-1", round=1))
    with pytest.raises(Denied, match="can only act as itself"):
        auth.authorize(me, "SubmitDecryption", decryption)


def test_a_method_without_an_entry_is_refused() -> None:
    for identity in (Identity("client-0", ROLE_CLIENT, "certificate"), None):
        with pytest.raises(Denied, match="no entry in the authorization table") as e:
            Authenticator(mtls=True, tokens=None).authorize(identity, "DropTables", None)
        assert e.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_interceptor_fails_closed_over_grpc_even_without_authentication() -> None:
    """A Coordinator method the server serves but ACCESS lacks gets PERMISSION_DENIED; one in
    ACCESS passes (authentication off, as with plaintext on loopback)."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def scenario() -> dict[str, grpc.StatusCode]:
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(Authenticator(mtls=False, tokens=None))]
        )
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(echo) for name in ("GetStatus", "Rogue")
        }
        service = SERVICE_PREFIX.strip("/")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for name in handlers:
                    call = channel.unary_unary(f"{SERVICE_PREFIX}{name}")
                    try:
                        assert await call(b"ping", timeout=10) == b"ping"
                        codes[name] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as e:
                        codes[name] = e.code()
                        assert "no entry in the authorization table" in (e.details() or "")
        finally:
            await server.stop(None)
        return codes

    codes = asyncio.run(scenario())
    assert codes == {"GetStatus": grpc.StatusCode.OK, "Rogue": grpc.StatusCode.PERMISSION_DENIED}


def _documented_access() -> dict[str, frozenset[str]]:
    """The rows of docs/security.md's "Who may call what" table that name one Coordinator RPC."""
    text = (DOCS / "security.md").read_text()
    section = text.split("## Who may call what", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m and m.group(1) in COORDINATOR_RPCS:
            rows[m.group(1)] = frozenset(r.strip() for r in m.group(2).split(","))
    return rows


def test_docs_security_table_lists_every_rpc_with_its_roles() -> None:
    assert _documented_access() == ACCESS


# ---------------------------------------------------------------- never live before the checks
def _coordinator(tmp: Path, secure: str, **kw: object):  # type: ignore[no-untyped-def]
    from examples.digits import task
    from fedserver.coordinator.central_eval import initial_model
    from fedserver.coordinator.lifecycle import Coordinator
    from fedserver.state.store import StateStore
    from fedserver.strategies import build_strategy

    policy = RoundPolicy(total_rounds=1, min_clients=3, round_timeout=60.0)
    coord = Coordinator(
        StateStore(tmp), build_strategy("fedavg"), policy, initial_model(task, 0),
        secure=secure, **kw,
    )  # fmt: skip
    coord.initialize_store("examples.digits:task")
    for c in ("a", "b", "c"):
        coord.touch(c, {})
    assert coord.machine.selected == frozenset({"a", "b", "c"})
    return coord


def test_refused_secagg_messages_do_not_mark_the_caller_live(tmp_path: Path) -> None:
    async def scenario() -> None:
        coord = _coordinator(tmp_path, "secagg")
        secure = coord.protocol
        key = bytes(32)
        refusals = [
            lambda: secure.advertise("stranger", 1, key, key),  # not selected
            lambda: secure.advertise("stranger", 9, key, key),  # no such round
            lambda: secure.share("stranger", 1, {"a": b"x"}),  # stage not reached
        ]
        for refused in refusals:
            with pytest.raises((SubmitRefused, BadUpdate)):
                refused()
        with pytest.raises(SubmitRefused):
            await secure.poll("stranger", 9, "roster", 0.0)
        assert "stranger" not in coord.machine.live_clients()
        secure.advertise("a", 1, key, bytes([1]) * 32)  # an accepted message still counts
        assert coord.machine.last_seen["a"] > coord.machine.last_seen["b"]

    asyncio.run(scenario())


def test_refused_he_calls_do_not_mark_the_caller_live(tmp_path: Path) -> None:
    pytest.importorskip("tenseal")
    import numpy as np

    from fedcore.he import generate_keys
    from fedserver.protocols.he import Decryption
    from fedserver.updates.messages import SubmitHeader

    _, public = generate_keys(tmp_path / "keys")

    async def scenario() -> None:
        coord = _coordinator(tmp_path / "state", "he", he_public_key=public)
        he = coord.protocol
        with pytest.raises(SubmitRefused):
            he.encrypted_aggregate("stranger", 1)  # nothing is being decrypted
        he.decryption = Decryption(1, np.zeros(8, np.uint8), asked="stranger")
        manifest = he.sum_manifest()
        header = SubmitHeader(
            "stranger", 1, "", 1, {}, "fp32", manifest, manifest.total_bytes, checksum="md5"
        )
        with pytest.raises(BadUpdate, match="unknown update checksum"):
            he.begin_decryption(header)  # every check but the checksum algorithm passes
        assert coord.rejections["bad_checksum"] == 1
        assert "stranger" not in coord.machine.live_clients()
        assert he.encrypted_aggregate("stranger", 1).size == 8  # asked: now it counts
        assert "stranger" in coord.machine.live_clients()

    asyncio.run(scenario())


def test_liveness_rpcs_act_only_as_the_caller() -> None:
    auth = Authenticator(mtls=True, tokens=None)
    me = Identity("client-0", ROLE_CLIENT, "certificate")
    auth.authorize(me, "Heartbeat", pb.HeartbeatRequest(client_id="client-0"))
    with pytest.raises(Denied, match="can only act as itself"):
        auth.authorize(me, "Heartbeat", pb.HeartbeatRequest(client_id="client-1"))
    with pytest.raises(Denied, match="can only act as itself"):  # nobody else's failure
        auth.authorize(me, "ReportFailure", pb.FailureReport(client_id="client-1", reason="x"))
