"""Who is calling, and may they? One server interceptor decides for every Coordinator RPC.

Authentication: with mTLS the peer's verified certificate names it (common name = client id,
organizational unit = role); with tokens, `authorization: Bearer TOKEN` metadata does. When both
are configured both are required and must name the same identity.

Authorization (the only place it happens) is the table ACCESS: every RPC of the Coordinator
service -> the roles that may call it. The interceptor looks every Coordinator call up there; a
method with no entry is refused with PERMISSION_DENIED even when authentication is off, so an RPC
added to the proto cannot be served before someone decides who may call it (and
tests/test_authz.py fails until they do). Besides the table:
  * gRPC health and reflection are open: probes and tools need them, and with mTLS the TLS
    handshake has already required a certificate from our CA anyway;
  * every client_id a request names (JoinRequest, GetGlobalModelRequest, the UpdateHeader, the
    EvaluationResult, the SecAgg and HE requests) must equal the caller's identity.
No or bad credentials -> UNAUTHENTICATED; a valid identity doing what it may not ->
PERMISSION_DENIED. The interceptor runs before the servicer, so a refused call never reaches
the coordinator (in particular it never marks the caller live).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedcore.limits import excerpt
from fedcore.proto import coordinator_pb2 as pb
from fedcore.security import TOKEN_METADATA, TOKEN_SCHEME
from fedserver.security.certs import ROLE_CLIENT, ROLE_OPERATOR, peer_role
from fedserver.security.tokens import TokenFileError, TokenStore
from fedserver.transport.interceptor import WrapOnce

log = logging.getLogger("fedserver.auth")

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
SERVICE_PREFIX = f"/{SERVICE.full_name}/"

CLIENTS = frozenset({ROLE_CLIENT})
ANY_ROLE = frozenset({ROLE_CLIENT, ROLE_OPERATOR})

# RPC -> roles allowed. Complete by test (tests/test_authz.py), mirrored in docs/security.md.
# The operator identity reads status; everything that trains, evaluates, takes part in secure
# aggregation or decrypts an aggregate is a client's, because doing it makes the caller a
# participant (live, selectable, possibly the HE key holder).
ACCESS: dict[str, frozenset[str]] = {
    "Join": CLIENTS,
    "GetGlobalModel": CLIENTS,
    "SubmitUpdate": CLIENTS,
    "GetStatus": ANY_ROLE,
    "AdvertiseKeys": CLIENTS,
    "ShareKeys": CLIENTS,
    "Unmask": CLIENTS,
    "GetSecAggStage": CLIENTS,
    "SubmitEvaluation": CLIENTS,
    "GetEncryptedAggregate": CLIENTS,
    "SubmitDecryption": CLIENTS,
    "Heartbeat": CLIENTS,
    "ReportFailure": CLIENTS,
}


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    source: str  # "certificate" | "token"


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@functools.lru_cache(maxsize=1024)
def _cert_identity(pem: bytes) -> tuple[str, str]:
    return peer_role(pem)


def claimed_client_id(message: Any) -> str | None:
    """The client id a request message acts as, if it names one."""
    if isinstance(message, pb.UpdateChunk):
        return message.header.client_id if message.WhichOneof("payload") == "header" else None
    return getattr(message, "client_id", None)


class Authenticator:
    def __init__(self, *, mtls: bool, tokens: TokenStore | None) -> None:
        self.mtls = mtls
        self.tokens = tokens
        self.on_denied: Callable[[str, grpc.StatusCode], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.mtls or self.tokens is not None

    def identify(self, metadata: Any, auth_context: dict[str, list[bytes]]) -> Identity:
        cert: Identity | None = None
        if self.mtls:
            pem = (auth_context.get("x509_pem_cert") or [b""])[0]
            name, role = _cert_identity(pem) if pem else ("", "")
            if not name:
                raise Denied(grpc.StatusCode.UNAUTHENTICATED, "no client certificate presented")
            cert = Identity(name, role or ROLE_CLIENT, "certificate")
        if self.tokens is None:
            assert cert is not None
            return cert
        values = [v for k, v in (metadata or ()) if k == TOKEN_METADATA]
        if not values:
            raise Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing token: pass --token (or FEDGRPC_TOKEN) from `fedserver tokens add`",
            )
        value = str(values[0])
        token = value[len(TOKEN_SCHEME) :] if value.startswith(TOKEN_SCHEME) else value
        entry = self.tokens.lookup(token)
        if entry is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token")
        if cert is not None and cert.name != entry.name:
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token belongs to {entry.name!r} but the certificate names {cert.name!r}",
            )
        return cert or Identity(entry.name, entry.role, "token")

    def authorize(self, identity: Identity | None, method: str, message: Any | None) -> None:
        """Raise Denied unless `identity` may call `method` (with `message`, when given).

        `identity` is None when authentication is off: then only the table's completeness is
        enforced (a method without an entry is still refused)."""
        roles = ACCESS.get(method)
        if roles is None:
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} has no entry in the authorization table "
                "(fedserver/transport/auth.py ACCESS); refused until it gets one",
            )
        if identity is None:
            return
        if identity.role not in roles:
            who = "clients" if roles == CLIENTS else "roles " + ", ".join(sorted(roles))
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name!r} has role {identity.role!r}; only {who} may call {method}",
            )
        if message is None:
            return
        claimed = claimed_client_id(message)
        if claimed is not None and claimed != identity.name:
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"authenticated as {identity.name!r} ({identity.source}) but acting as client "
                f"{excerpt(claimed)}; a client can only act as itself",
            )


class AuthInterceptor(WrapOnce):
    """Wraps every Coordinator handler so each call is authenticated and each message checked.

    Installed whether or not authentication is configured: without it, methods in ACCESS pass
    through unwrapped (no per-message cost) and any other Coordinator method is refused."""

    def __init__(self, auth: Authenticator) -> None:
        super().__init__()
        self.auth = auth

    def wrap(self, handler: grpc.RpcMethodHandler, method_path: str) -> grpc.RpcMethodHandler:
        if not method_path.startswith(SERVICE_PREFIX):
            return handler  # health, reflection
        method = method_path[len(SERVICE_PREFIX) :]
        if not self.auth.enabled and method in ACCESS:
            return handler
        return _wrap(handler, method, self.auth)


async def _check(
    auth: Authenticator, method: str, context: grpc.aio.ServicerContext, message: Any | None,
    identity: Identity | None = None,
) -> Identity | None:  # fmt: skip
    try:
        if identity is None and auth.enabled:
            identity = auth.identify(context.invocation_metadata(), context.auth_context())
        auth.authorize(identity, method, message)
        return identity
    except Denied as e:
        # Logged (one line, with the peer) by the BoundedContext that aborts the call.
        if auth.on_denied is not None:
            auth.on_denied(method, e.code)
        await context.abort(e.code, str(e))
        raise AssertionError("unreachable") from None


def _wrap(h: grpc.RpcMethodHandler, method: str, auth: Authenticator) -> grpc.RpcMethodHandler:
    kw = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }
    if h.unary_unary:

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _check(auth, method, context, request)
            return await h.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if h.unary_stream and inspect.iscoroutinefunction(h.unary_stream):
        # gRPC's writer API (the handler calls context.write itself: model downloads, whose
        # writes are timed in fedserver/transport/downloads.py); gRPC tells the kinds apart by the
        # outermost function, so the wrapper must be a coroutine function too.
        async def unary_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            await _check(auth, method, context, request)
            await h.unary_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_writer, **kw)
    if h.unary_stream:

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await _check(auth, method, context, request)
            async for reply in h.unary_stream(request, context):
                yield reply

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if h.stream_unary:

        async def stream_unary(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            identity = await _check(auth, method, context, None)

            async def checked() -> AsyncIterator[Any]:
                async for message in requests:
                    await _check(auth, method, context, message, identity)
                    yield message

            return await h.stream_unary(checked(), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    if h.stream_stream:

        async def stream_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            identity = await _check(auth, method, context, None)

            async def checked() -> AsyncIterator[Any]:
                async for message in requests:
                    await _check(auth, method, context, message, identity)
                    yield message

            async for reply in h.stream_stream(checked(), context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
    raise TypeError(f"{method}: a handler of unknown kind")


def build_authenticator(mtls: bool, tokens_file: Path | None) -> Authenticator:
    try:
        tokens = TokenStore(tokens_file) if tokens_file is not None else None
    except OSError as e:
        raise TokenFileError(
            f"cannot read token file {tokens_file}: {e.strerror}; create it with "
            "`fedserver tokens add NAME --file FILE`"
        ) from None
    return Authenticator(mtls=mtls, tokens=tokens)
