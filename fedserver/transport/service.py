"""The gRPC servicer: parse and validate messages, delegate to the Coordinator, map errors.

The RPCs of a round protocol's own stages (secure aggregation, HE decryption) are forwarded to
the handlers in fedserver/transport/secure_service.py, which serve the running protocol's stage or
refuse; the shared checks and the status-code mapping are in fedserver/transport/rpc.py.

Status codes (docs/protocol.md): INVALID_ARGUMENT for malformed updates, FAILED_PRECONDITION for
stale rounds and base versions, ALREADY_EXISTS for a different update replacing a counted one,
PERMISSION_DENIED for clients not selected, RESOURCE_EXHAUSTED for oversized updates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from fedcore import checksums, faults
from fedcore.checksums import LEGACY as LEGACY_CHECKSUM
from fedcore.limits import MAX_STATUS_BYTES, MAX_STATUS_ROUNDS
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import DEFAULT_CHUNK_SIZE
from fedserver.coordinator.api import CoordinatorAPI
from fedserver.rounds.synchronous import SubmitRefused
from fedserver.transport.admission import Admission
from fedserver.transport.downloads import DownloadLimits, Downloads, FramedWindow, framed
from fedserver.transport.headers import (
    STATES,
    ModelHeaders,
    check_metrics,
    check_properties,
    parse_update_header,
)
from fedserver.transport.joinlog import JoinLog
from fedserver.transport.liveness_service import LivenessRPCs
from fedserver.transport.pacing import UploadPacer
from fedserver.transport.rpc import (
    CORRUPT,
    MAX_WAIT_SECONDS,
    check_decoded,
    check_request,
    status_for,
    submit_reply,
    trailers_for,
)
from fedserver.transport.secure_service import HomomorphicRPCs, SecureAggregationRPCs
from fedserver.updates.messages import PendingSubmit, SubmitHeader, SubmitResult
from fedserver.updates.receiver import BadUpdate

log = logging.getLogger("fedserver.service")


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        coordinator: CoordinatorAPI,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        downloads: DownloadLimits | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.chunk_size = chunk_size
        self.headers = ModelHeaders(coordinator.policy.total_rounds)  # transport/headers.py
        # Per-client open downloads, send slots, stalled writes (fedserver/transport/downloads.py).
        self.downloads = Downloads(downloads or DownloadLimits(), coordinator.reject)
        self.model_frames = FramedWindow()  # the global model's chunks, framed once per round
        # The round protocol's own stages: served if it has them, refused otherwise.
        protocol = coordinator.protocol
        self.secagg = SecureAggregationRPCs(protocol)
        self.he = HomomorphicRPCs(
            protocol, self._receive, coordinator.metrics, chunk_size, self.downloads
        )
        self.liveness = LivenessRPCs(coordinator.liveness)
        self.joins = JoinLog()
        self.admission = Admission(coordinator)  # Join: matching model, one live peer per id
        self.pacer = UploadPacer()

    # The protocol stages' RPCs, forwarded (refused there unless the protocol has the stage).
    async def AdvertiseKeys(
        self, request: pb.AdvertiseKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggAck:
        return await self.secagg.AdvertiseKeys(request, context)

    async def ShareKeys(
        self, request: pb.ShareKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggAck:
        return await self.secagg.ShareKeys(request, context)

    async def Unmask(
        self, request: pb.UnmaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggAck:
        return await self.secagg.Unmask(request, context)

    async def GetSecAggStage(
        self, request: pb.SecAggStageRequest, context: grpc.aio.ServicerContext
    ) -> pb.SecAggStage:
        return await self.secagg.GetSecAggStage(request, context)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        return await self.liveness.Heartbeat(request, context)

    async def ReportFailure(
        self, request: pb.FailureReport, context: grpc.aio.ServicerContext
    ) -> pb.FailureReply:
        return await self.liveness.ReportFailure(request, context)

    async def SubmitDecryption(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitReply:
        return await self.he.SubmitDecryption(request_iterator, context)

    async def GetEncryptedAggregate(
        self, request: pb.EncryptedAggregateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self.he.GetEncryptedAggregate(request, context)

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        await check_request(context, request)
        if problem := check_properties(request.properties):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if problem := self.admission.model_mismatch(request):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        if problem := self.admission.claim(request.client_id, context.peer(), request.instance):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, problem)
        properties = dict(request.properties)
        self.coordinator.touch(request.client_id, properties)
        self.joins.joined(request.client_id, context.peer, properties)
        return pb.JoinReply(
            client_id=request.client_id,
            federation_id=self.coordinator.federation_id,
            chunk_size=self.chunk_size,
            max_update_bytes=self.coordinator.max_update_bytes,
            heartbeat_seconds=self.coordinator.liveness.heartbeat_interval(),
            checksums=checksums.ALGORITHMS,
        )

    async def GetGlobalModel(
        self, request: pb.GetGlobalModelRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await check_request(context, request)
        with await self.downloads.open(context, request.client_id):  # until it ends, however
            await self._pull(request, context)

    async def _pull(
        self, request: pb.GetGlobalModelRequest, context: grpc.aio.ServicerContext
    ) -> None:
        wait = min(max(request.wait_seconds, 0.0), MAX_WAIT_SECONDS)
        offer = await self.coordinator.poll(request.client_id, request.known_version, wait)
        await context.write(pb.ModelChunk(header=self.headers.build(offer)))
        extra = offer.strategy_tensors  # SCAFFOLD's c: its own chunks, after the model's
        if not offer.send_bytes and extra is None:
            return
        if offer.selected:
            await self.pacer.before_send(request.client_id, offer.round)
        metrics = self.coordinator.metrics
        messages = itertools.chain(
            framed(offer.model.buffer, self.chunk_size, metrics, self.model_frames)
            if offer.send_bytes
            else (),
            framed(extra.buffer, self.chunk_size, metrics) if extra is not None else (),
        )
        await self.downloads.stream(context, messages)

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitReply:
        c = self.coordinator
        result = await self._receive(request_iterator, context, c.begin_submit, c.finish_submit)
        if faults.fire("reply", result.round):  # tests: the client must retry a counted update
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fault injection: reply dropped")
        return submit_reply(result)

    async def _receive(
        self,
        request_iterator: AsyncIterator[pb.UpdateChunk],
        context: grpc.aio.ServicerContext,
        begin: Callable[[SubmitHeader], PendingSubmit],
        finish: Callable[[PendingSubmit, str], SubmitResult],
    ) -> SubmitResult:
        """Read one header/data/trailer stream: `begin` checks the header, `finish` the whole
        stream; both count their own refusals."""
        coordinator = self.coordinator
        # Data chunks arrive as memoryviews of the received bytes (see registration.add_to_server).
        first = await anext(aiter(request_iterator), ...)  # ... = the stream was empty
        try:
            if first is None:
                raise BadUpdate(CORRUPT, "corrupt_message")
            if not isinstance(first, pb.UpdateChunk) or first.WhichOneof("payload") != "header":
                raise BadUpdate("the first message must be an UpdateHeader", "bad_stream")
            header = parse_update_header(first.header, coordinator.max_update_tensors())
            self.pacer.upload_started(header.client_id)
        except BadUpdate as e:
            coordinator.reject(e)
            await context.abort(status_for(e), str(e))
        await coordinator.settled()  # asynchronous rounds: a buffer being applied
        try:
            pending = begin(header)
        except (BadUpdate, SubmitRefused) as e:
            await context.abort(status_for(e), str(e), trailers_for(e))
        log.debug(
            "receiving from %s for round %d (%d bytes)",
            header.client_id,
            header.round,
            header.total_bytes,
        )
        # From here the stream holds an upload slot (its client's and one of all): whatever ends
        # it (a refusal, the client cancelling, its deadline, a lost link, an error, the server
        # stopping, or success) the `finally` gives it back; after `finish` that is a no-op.
        try:
            digest = await self._read_stream(request_iterator, header, pending)
            await coordinator.settled()  # a buffer may have started being applied meanwhile
            return finish(pending, digest)
        except (BadUpdate, SubmitRefused) as e:
            if getattr(e, "reason", "") == "truncated":  # which upload broke: the refusal line
                _log_broken_upload(header, pending.receiver.received, str(e))  # has no client
            await context.abort(status_for(e), str(e), trailers_for(e))
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            _log_broken_upload(header, pending.receiver.received, "connection lost")
            raise
        finally:
            coordinator.abort_submit(pending)

    async def _read_stream(
        self,
        request_iterator: AsyncIterator[pb.UpdateChunk],
        header: SubmitHeader,
        pending: PendingSubmit,
    ) -> str:
        """The data chunks into `pending`; returns the trailer's digest. Raises BadUpdate
        (counted) for a malformed or truncated stream."""
        digest = None
        try:
            async for msg in request_iterator:
                if msg is None:
                    raise BadUpdate(CORRUPT, "corrupt_message")
                kind = "data" if isinstance(msg, memoryview) else msg.WhichOneof("payload")
                if digest is not None or kind == "header":
                    raise BadUpdate(
                        "unexpected message after the trailer or a second header", "bad_stream"
                    )
                if kind == "data":
                    pending.receiver.add(msg if isinstance(msg, memoryview) else msg.data)
                elif kind == "trailer":
                    legacy = header.checksum == LEGACY_CHECKSUM
                    digest = msg.trailer.sha256 if legacy else msg.trailer.digest
                else:
                    raise BadUpdate("empty UpdateChunk", "bad_stream")
            if digest is None:
                raise BadUpdate("update stream ended without a trailer (truncated)", "truncated")
        except BadUpdate as e:  # logged as the refusal (one line)
            self.coordinator.abort_submit(pending)
            raise self.coordinator.reject(e) from None
        return digest

    async def SubmitEvaluation(
        self, request: pb.EvaluationResult, context: grpc.aio.ServicerContext
    ) -> pb.EvaluationReply:
        await check_request(context, request)
        if problem := check_metrics(request.metrics):
            self.coordinator.reject(BadUpdate(problem, "bad_metrics"))
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
        await check_decoded(context, request)
        c = self.coordinator
        v = c.status()
        reply = pb.GetStatusReply(
            state=STATES[v.state],
            current_round=v.round,
            total_rounds=v.total_rounds,
            rounds_completed=v.rounds_completed,
            live_clients=v.live_clients,
            updates_received=v.updates_received,
            updates_expected=v.updates_expected,
            federation_id=v.federation_id,
            rejections=v.rejections,
            failure=v.failure,
        )
        # Bounded whatever the history holds: the latest MAX_STATUS_ROUNDS rounds, newest
        # first until MAX_STATUS_BYTES, listed oldest first; rounds_omitted counts the rest.
        records, total = c.recent_rounds(MAX_STATUS_ROUNDS)
        summaries: list[pb.RoundSummary] = []
        size = 0
        for r in reversed(records):
            summary = pb.RoundSummary(
                round=r.round,
                participants=r.participants,
                num_examples=r.num_examples,
                metrics=r.metrics,
                duration_seconds=r.duration,
                model_version=r.model_version,
            )
            size += summary.ByteSize() + 8  # + tag and length prefix
            if size > MAX_STATUS_BYTES:
                break
            summaries.append(summary)
        reply.rounds.extend(reversed(summaries))
        reply.rounds_omitted = total - len(summaries)
        return reply


def _log_broken_upload(header: SubmitHeader, received: int, why: str) -> None:
    log.info(
        "upload from %s for round %d ended after %d of %d bytes (%s); nothing counted",
        header.client_id,
        header.round,
        received,
        header.total_bytes,
        why,
    )
