"""The gRPC servicer: parse and validate messages, delegate to the Coordinator, map errors.

Status codes (docs/protocol.md): INVALID_ARGUMENT for malformed updates, FAILED_PRECONDITION for
stale rounds and base versions, ALREADY_EXISTS for a different update replacing a counted one,
PERMISSION_DENIED for clients not selected, RESOURCE_EXHAUSTED for oversized updates.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedcore import faults
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import DEFAULT_CHUNK_SIZE, ManifestError, iter_chunks
from fedcore.wire import (
    data_message,
    manifest_from_proto,
    manifest_to_proto,
    parse_update_chunk,
    serialize_message,
)
from fedserver.aggregate import BadUpdate, UpdateTooLarge
from fedserver.coordinator import Coordinator
from fedserver.messages import Offer, SubmitHeader, TooManyStreams
from fedserver.rounds import AlreadySubmitted, NotSelected, StaleRound, SubmitRefused
from fedserver.secagg import SecAggFailed

log = logging.getLogger("fedserver.service")

MAX_WAIT_SECONDS = 30.0
MAX_CLIENT_ID = 128
_STATES = {
    "waiting_for_clients": pb.WAITING_FOR_CLIENTS,
    "training": pb.TRAINING,
    "finished": pb.FINISHED,
    "shutting_down": pb.SHUTTING_DOWN,
}


def status_for(exc: Exception) -> grpc.StatusCode:
    # Order matters: subclasses before their bases.
    for kind, code in (
        (TooManyStreams, grpc.StatusCode.ABORTED),
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


def _check_client_id(client_id: str) -> str | None:
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


_WANT = {pb.SECAGG_ROSTER: "roster", pb.SECAGG_INBOX: "inbox", pb.SECAGG_UNMASK: "unmask"}
_REFUSALS = (BadUpdate, SubmitRefused, SecAggFailed)


class SecureAggregationService:
    """The secure-aggregation RPCs (mixed into CoordinatorService): validate, delegate, map."""

    coordinator: Coordinator

    async def _secure(self, context: grpc.aio.ServicerContext, request: Any):  # type: ignore[no-untyped-def]
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT)
        if problem := _check_client_id(request.client_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        secure = self.coordinator.secure_rounds
        if secure is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this coordinator does not run secure aggregation (fedserver run --secure secagg)",
            )
        return secure

    async def AdvertiseKeys(
        self, request: pb.AdvertiseKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggAck:
        secure = await self._secure(context, request)
        try:
            secure.advertise(
                request.client_id,
                request.round,
                request.channel_public_key,
                request.mask_public_key,
            )
        except _REFUSALS as e:
            await context.abort(status_for(e), str(e))
        return pb.SecAggAck(accepted=True)

    async def ShareKeys(
        self, request: pb.ShareKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggAck:
        secure = await self._secure(context, request)
        shares = {s.peer_id: s.ciphertext for s in request.shares}
        try:
            if len(shares) != len(request.shares):
                raise BadUpdate("two shares are addressed to the same peer")
            secure.share(request.client_id, request.round, shares)
        except _REFUSALS as e:
            await context.abort(status_for(e), str(e))
        return pb.SecAggAck(accepted=True)

    async def Unmask(
        self, request: pb.UnmaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggAck:
        secure = await self._secure(context, request)
        seeds = {s.owner_id: s.share for s in request.self_mask_shares}
        keys = {s.owner_id: s.share for s in request.mask_key_shares}
        try:
            secure.reveal(request.client_id, request.round, seeds, keys)
        except _REFUSALS as e:
            await context.abort(status_for(e), str(e))
        return pb.SecAggAck(accepted=True)

    async def GetSecAggStage(
        self, request: pb.SecAggStageRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggStage:
        secure = await self._secure(context, request)
        want = _WANT.get(request.step)
        if want is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "step must be set")
        wait = min(max(request.wait_seconds, 0.0), MAX_WAIT_SECONDS)
        try:
            view = await secure.poll(request.client_id, request.round, want, wait)
        except _REFUSALS as e:
            await context.abort(status_for(e), str(e))
        reply = pb.SecAggStage(ready=view is not None, step=request.step)
        if view is None:
            return reply
        reply.threshold = int(view.get("threshold", 0))  # type: ignore[call-overload]
        for cid, (channel, mask) in view.get("roster", {}).items():  # type: ignore[attr-defined]
            reply.roster.append(
                pb.RosterEntry(client_id=cid, channel_public_key=channel, mask_public_key=mask)
            )
        for sender, box in view.get("inbox", {}).items():  # type: ignore[attr-defined]
            reply.inbox.append(pb.EncryptedShare(peer_id=sender, ciphertext=box))
        reply.survivors.extend(view.get("survivors", ()))  # type: ignore[arg-type]
        reply.dropped.extend(view.get("dropped", ()))  # type: ignore[arg-type]
        return reply


class CoordinatorService(SecureAggregationService, pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.coordinator = coordinator
        self.chunk_size = chunk_size

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT)
        if problem := _check_client_id(request.client_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        self.coordinator.touch(request.client_id, dict(request.properties))
        log.info(
            "client %s joined from %s (%s)",
            request.client_id,
            context.peer(),
            dict(request.properties) or "-",
        )
        return pb.JoinReply(
            client_id=request.client_id,
            federation_id=self.coordinator.federation_id,
            chunk_size=self.chunk_size,
            max_update_bytes=self.coordinator.max_update_bytes,
        )

    async def GetGlobalModel(
        self, request: pb.GetGlobalModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelChunk]:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CORRUPT)
        if problem := _check_client_id(request.client_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        wait = min(max(request.wait_seconds, 0.0), MAX_WAIT_SECONDS)
        offer = await self.coordinator.poll(request.client_id, request.known_version, wait)
        yield pb.ModelChunk(header=self._header(offer))
        if offer.send_bytes:
            # Framed straight from the model buffer: one copy per chunk into a ready-to-send
            # message (gRPC copies it once more into its send buffer), no protobuf round trips.
            # Caching the framed chunks per version would save that copy (~2% of a round) at
            # the price of a second model-sized buffer; memory is the scarcer resource.
            for chunk in iter_chunks(offer.model.buffer, self.chunk_size):
                yield data_message(chunk)
                self.coordinator.metrics.sent(len(chunk))

    def _header(self, offer: Offer) -> pb.ModelHeader:
        cfg = offer.config
        header = pb.ModelHeader(
            state=_STATES[offer.state],
            round=offer.round,
            selected=offer.selected,
            total_rounds=self.coordinator.policy.total_rounds,
            deadline_seconds=offer.deadline_seconds,
            message=offer.message,
        )
        if offer.selected or offer.evaluate_round:
            header.model_version = offer.model.version
            header.manifest.CopyFrom(manifest_to_proto(offer.model.manifest))
            header.total_bytes = offer.model.buffer.size if offer.send_bytes else 0
            header.evaluate_round = offer.evaluate_round
        if offer.selected:
            header.config.CopyFrom(
                pb.RoundConfig(
                    local_epochs=int(cfg["local_epochs"]),  # type: ignore[call-overload]
                    lr=float(cfg["lr"]),  # type: ignore[arg-type]
                    batch_size=int(cfg["batch_size"]),  # type: ignore[call-overload]
                    encoding=str(cfg["encoding"]),
                    extra=dict(cfg["extra"]),  # type: ignore[call-overload]
                )
            )
        return header

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitReply:
        coordinator = self.coordinator
        # Data chunks arrive as memoryviews of the received bytes (see add_to_server).
        first = await anext(aiter(request_iterator), ...)  # ... = the stream was empty
        try:
            if first is None:
                raise BadUpdate(CORRUPT, "corrupt_message")
            if not isinstance(first, pb.UpdateChunk) or first.WhichOneof("payload") != "header":
                raise BadUpdate("the first message must be an UpdateHeader", "bad_stream")
            header = _parse_header(first.header)
        except BadUpdate as e:
            coordinator.reject(e)
            await context.abort(status_for(e), str(e))
        try:
            pending = coordinator.begin_submit(header)  # counts its own refusals
        except (BadUpdate, SubmitRefused) as e:
            await context.abort(status_for(e), str(e))
        log.debug(
            "receiving update from %s for round %d (%d bytes)",
            header.client_id,
            header.round,
            header.total_bytes,
        )
        sha256 = None
        try:
            async for msg in request_iterator:
                if msg is None:
                    raise BadUpdate(CORRUPT, "corrupt_message")
                kind = "data" if isinstance(msg, memoryview) else msg.WhichOneof("payload")
                if sha256 is not None or kind == "header":
                    raise BadUpdate(
                        "unexpected message after the trailer or a second header", "bad_stream"
                    )
                if kind == "data":
                    pending.receiver.add(msg if isinstance(msg, memoryview) else msg.data)
                elif kind == "trailer":
                    sha256 = msg.trailer.sha256
                else:
                    raise BadUpdate("empty UpdateChunk", "bad_stream")
            if sha256 is None:
                raise BadUpdate("update stream ended without a trailer (truncated)", "truncated")
        except BadUpdate as e:
            _log_broken_upload(header, pending.receiver.received, str(e))
            coordinator.abort_submit(pending)
            coordinator.reject(e)
            await context.abort(status_for(e), str(e))
        except BaseException:
            # Client went away (cancelled) or the server is stopping: nothing was counted.
            _log_broken_upload(header, pending.receiver.received, "connection lost")
            coordinator.abort_submit(pending)
            raise
        try:
            result = coordinator.finish_submit(pending, sha256)
        except (BadUpdate, SubmitRefused) as e:
            await context.abort(status_for(e), str(e))
        if faults.fire("reply", result.round):  # tests: the client must retry a counted update
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fault injection: reply dropped")
        return pb.SubmitReply(
            accepted=True, duplicate=result.duplicate, round=result.round, message=result.message
        )

    async def SubmitEvaluation(
        self, request: pb.EvaluationResult, context: grpc.aio.ServicerContext
    ) -> pb.EvaluationReply:
        if problem := _check_client_id(request.client_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            new, message = self.coordinator.submit_evaluation(
                request.client_id,
                request.round,
                request.model_version,
                request.num_examples,
                dict(request.metrics),
            )
        except (BadUpdate, SubmitRefused) as e:
            await context.abort(status_for(e), str(e))
        return pb.EvaluationReply(accepted=True, duplicate=not new, message=message)

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusReply:
        c = self.coordinator
        m = c.machine
        reply = pb.GetStatusReply(
            state=_STATES[c.state_name()],
            current_round=m.round,
            total_rounds=c.policy.total_rounds,
            rounds_completed=m.rounds_completed,
            live_clients=len(m.live_clients()),
            updates_received=len(m.receipts),
            updates_expected=len(m.selected),
            federation_id=c.federation_id,
            rejections=dict(c.rejections),
        )
        for r in c.store.rounds():
            reply.rounds.append(
                pb.RoundSummary(
                    round=r.round,
                    participants=r.participants,
                    num_examples=r.num_examples,
                    metrics=r.metrics,
                    duration_seconds=r.duration,
                    model_version=r.model_version,
                )
            )
        return reply


def add_to_server(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """Register the service like the generated add_CoordinatorServicer_to_server, with two
    serializers swapped for copy-free ones: GetGlobalModel may yield pre-serialized bytes, and
    SubmitUpdate's data chunks are delivered as views of the received message. Every other RPC
    (including ones added to the proto later) keeps its generated handler."""

    class _Capture:
        name = ""
        handlers: dict[str, grpc.RpcMethodHandler] = {}

        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(
            self, name: str, handlers: dict[str, grpc.RpcMethodHandler]
        ) -> None:
            self.name, self.handlers = name, dict(handlers)

    capture = _Capture()
    pb_grpc.add_CoordinatorServicer_to_server(service, capture)
    handlers = capture.handlers
    handlers["GetGlobalModel"] = handlers["GetGlobalModel"]._replace(  # type: ignore[attr-defined]
        response_serializer=serialize_message
    )
    handlers["SubmitUpdate"] = handlers["SubmitUpdate"]._replace(  # type: ignore[attr-defined]
        request_deserializer=parse_update_chunk
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.name, handlers),))
    server.add_registered_method_handlers(capture.name, handlers)


def _log_broken_upload(header: SubmitHeader, received: int, why: str) -> None:
    log.info(
        "upload from %s for round %d ended after %d of %d bytes (%s); nothing counted",
        header.client_id,
        header.round,
        received,
        header.total_bytes,
        why,
    )


def _parse_header(h: pb.UpdateHeader) -> SubmitHeader:
    if problem := _check_client_id(h.client_id):
        raise BadUpdate(problem, "bad_client_id")
    try:
        manifest = manifest_from_proto(h.manifest)
    except (ManifestError, ValueError) as e:
        raise BadUpdate(f"invalid manifest: {e}", reason="bad_manifest") from None
    return SubmitHeader(
        client_id=h.client_id,
        round=h.round,
        base_version=h.base_version,
        num_examples=h.num_examples,
        metrics=dict(h.metrics),
        encoding=h.encoding or "fp32",
        manifest=manifest,
        total_bytes=h.total_bytes,
    )
