"""What every RPC handler shares: status codes for refusals, request checks, lenient decoding.

Status codes (docs/protocol.md): INVALID_ARGUMENT for malformed updates, FAILED_PRECONDITION for
stale rounds and base versions, ALREADY_EXISTS for a different update replacing a counted one,
PERMISSION_DENIED for clients not selected, RESOURCE_EXHAUSTED for oversized updates.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedcore.limits import clip_message
from fedcore.proto import coordinator_pb2 as pb
from fedserver.protocols.secagg_stages import SecAggFailed
from fedserver.rounds.synchronous import AlreadySubmitted, NotSelected, StaleRound
from fedserver.transport.headers import check_client_id, check_strings
from fedserver.transport.interceptor import WrapOnce
from fedserver.updates.messages import CoordinatorBusy, SubmitResult, TooManyStreams
from fedserver.updates.receiver import BadUpdate, SpillCorrupted, UpdateTooLarge

MAX_WAIT_SECONDS = 30.0
log = logging.getLogger("fedserver.rpc")


def status_for(exc: Exception) -> grpc.StatusCode:
    # Order matters: subclasses before their bases.
    for kind, code in (
        (TooManyStreams, grpc.StatusCode.ABORTED),
        (CoordinatorBusy, grpc.StatusCode.UNAVAILABLE),
        (UpdateTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (SpillCorrupted, grpc.StatusCode.INTERNAL),  # our disk, not the client's bytes: retry
        (BadUpdate, grpc.StatusCode.INVALID_ARGUMENT),
        (AlreadySubmitted, grpc.StatusCode.ALREADY_EXISTS),
        (NotSelected, grpc.StatusCode.PERMISSION_DENIED),
        (StaleRound, grpc.StatusCode.FAILED_PRECONDITION),
        (SecAggFailed, grpc.StatusCode.FAILED_PRECONDITION),
    ):
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def trailers_for(exc: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a refusal: how long a shed client should stay away."""
    if isinstance(exc, CoordinatorBusy):
        return (("retry-after-ms", str(exc.retry_after_ms)),)
    return ()


def submit_reply(result: SubmitResult) -> pb.SubmitReply:
    """The answer to an accepted upload (an update or a decrypted aggregate)."""
    return pb.SubmitReply(
        accepted=True, duplicate=result.duplicate, round=result.round, message=result.message
    )


async def check_decoded(context: grpc.aio.ServicerContext, request: Any) -> None:
    """Abort with INVALID_ARGUMENT if `request` did not decode (see LenientDecoding)."""
    if request is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT)


async def check_request(context: grpc.aio.ServicerContext, request: Any) -> None:
    """Abort with INVALID_ARGUMENT unless `request` decoded, names a usable client_id and keeps
    every other top-level string within limits.MAX_STRING."""
    await check_decoded(context, request)
    if problem := check_client_id(request.client_id) or check_strings(request):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


class LenientDecoding(WrapOnce):
    """Hand undecodable protobuf to the servicer as None instead of failing with UNKNOWN.

    gRPC answers a request its deserializer cannot parse with UNKNOWN and logs a traceback; a
    hostile or broken peer must get INVALID_ARGUMENT like any other bad input, and be counted.
    """

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError:
                return None

        return handler._replace(request_deserializer=lenient)  # type: ignore[attr-defined]


CORRUPT = "message is not valid protobuf for this RPC (corrupt or wrong type)"


class BoundedContext:
    """A ServicerContext whose status messages are cut to limits.MAX_REFUSAL_MESSAGE bytes, and
    that logs each refusal as one line.

    Refusals quote client input; gRPC sends the message as trailing metadata, and a peer whose
    metadata limit (8 KiB by default) is exceeded sees a local RESOURCE_EXHAUSTED instead of
    our code. Every handler gets this context (BoundedReplies), so no refusal path escapes.

    Anything a client sends is an expected event: its refusal is one log line (method, status,
    reason, peer), never a traceback. A refusal of a call the client already cancelled (or
    whose stream cannot take a status any more) fails inside gRPC; it is ended as a cancelled
    call, which gRPC finishes quietly, instead of surfacing gRPC's ExecuteBatchError."""

    def __init__(self, inner: grpc.aio.ServicerContext, method: str = "") -> None:
        self._inner = inner
        self._method = method.rsplit("/", 1)[-1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        details = clip_message(details)
        level = logging.WARNING if code in _SECURITY_CODES else logging.INFO
        log.log(
            level,
            "%s refused (%s): %s [peer %s]",
            self._method,
            code.name,
            details.replace("\n", "\\n"),
            self._inner.peer(),
        )
        try:
            await self._inner.abort(code, details, trailing_metadata)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # ExecuteBatchError: the call is gone (cancelled, deadline)
            log.debug("%s: status not sent, the call is gone (%s)", self._method, e)
            raise asyncio.CancelledError from None

    def set_details(self, details: str) -> None:
        self._inner.set_details(clip_message(details))


# Refusals an operator should notice (credentials, a caller doing what it may not).
_SECURITY_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


UNEXPECTED = "unexpected error in the coordinator (see its log)"


class BoundedReplies(WrapOnce):
    """Run every handler with a BoundedContext, and answer an unexpected exception with a short
    UNKNOWN instead of gRPC's default, which puts the exception's text (maybe client input,
    maybe megabytes) into the status message."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        for kind in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is None:
                continue
            if inspect.isasyncgenfunction(behaviour):
                wrapped = _bounded_stream(behaviour, method)
            elif inspect.iscoroutinefunction(behaviour):
                wrapped = _bounded_unary(behaviour, method)
            else:  # a synchronous handler (none of ours): leave it to gRPC
                return handler
            return handler._replace(**{kind: wrapped})  # type: ignore[attr-defined]
        return handler


def _bounded_unary(behaviour: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, BoundedContext(context, method))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("%s failed", method)
            await _abort_unexpected(context)

    return run


def _bounded_stream(behaviour: Callable[..., AsyncIterator[Any]], method: str) -> Any:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behaviour(request, BoundedContext(context, method)):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("%s failed", method)
            await _abort_unexpected(context)

    return run


async def _abort_unexpected(context: grpc.aio.ServicerContext) -> None:
    """UNKNOWN for an unexpected exception, unless a status was already sent or attempted
    (aborting twice is gRPC's UsageError, logged with a second traceback by gRPC itself)."""
    if not context.done():
        await context.abort(grpc.StatusCode.UNKNOWN, UNEXPECTED)
