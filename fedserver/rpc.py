"""What every RPC handler shares: status codes for refusals, request checks, lenient decoding.

Status codes (docs/protocol.md): INVALID_ARGUMENT for malformed updates, FAILED_PRECONDITION for
stale rounds and base versions, ALREADY_EXISTS for a different update replacing a counted one,
PERMISSION_DENIED for clients not selected, RESOURCE_EXHAUSTED for oversized updates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedcore.proto import coordinator_pb2 as pb
from fedserver.aggregate import BadUpdate, UpdateTooLarge
from fedserver.messages import CoordinatorBusy, SubmitResult, TooManyStreams
from fedserver.rounds import AlreadySubmitted, NotSelected, StaleRound
from fedserver.secagg import SecAggFailed

MAX_WAIT_SECONDS = 30.0
MAX_CLIENT_ID = 128


def status_for(exc: Exception) -> grpc.StatusCode:
    # Order matters: subclasses before their bases.
    for kind, code in (
        (TooManyStreams, grpc.StatusCode.ABORTED),
        (CoordinatorBusy, grpc.StatusCode.UNAVAILABLE),
        (UpdateTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
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


async def check_request(context: grpc.aio.ServicerContext, request: Any) -> None:
    """Abort with INVALID_ARGUMENT unless `request` decoded and names a usable client_id."""
    if request is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT)
    if problem := check_client_id(request.client_id):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


def check_client_id(client_id: str) -> str | None:
    if not client_id:
        return "client_id is required"
    if len(client_id) > MAX_CLIENT_ID or not client_id.isprintable():
        return f"client_id must be printable and at most {MAX_CLIENT_ID} characters"
    return None


class LenientDecoding(grpc.aio.ServerInterceptor):
    """Hand undecodable protobuf to the servicer as None instead of failing with UNKNOWN.

    gRPC answers a request its deserializer cannot parse with UNKNOWN and logs a traceback; a
    hostile or broken peer must get INVALID_ARGUMENT like any other bad input, and be counted.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError:
                return None

        return handler._replace(request_deserializer=lenient)  # type: ignore[attr-defined]


CORRUPT = "message is not valid protobuf for this RPC (corrupt or wrong type)"
