"""The RPCs of the round protocols' own stages: validate, delegate to the stage, map errors.

CoordinatorService (service.py) owns one of each and forwards to them. SecureAggregationRPCs
serves the "secagg" stage of `--secure secagg` (key exchange, shares, unmasking),
HomomorphicRPCs the "he" stage of `--secure he` (the encrypted aggregate and its decryption).
When the running protocol has no such stage, every RPC is refused with FAILED_PRECONDITION.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fedcore.proto import coordinator_pb2 as pb
from fedcore.wire import manifest_to_proto
from fedserver.protocols.base import RoundProtocol
from fedserver.protocols.he import HEProtocol
from fedserver.protocols.secagg import SecAggProtocol
from fedserver.protocols.secagg_stages import SecAggFailed
from fedserver.rounds.synchronous import SubmitRefused
from fedserver.state.metrics import Metrics
from fedserver.transport.downloads import Downloads, framed
from fedserver.transport.rpc import MAX_WAIT_SECONDS, check_request, status_for, submit_reply
from fedserver.updates.messages import PendingSubmit, SubmitHeader, SubmitResult
from fedserver.updates.receiver import BadUpdate

# Reads one header/data/trailer upload stream (CoordinatorService._receive).
Receive = Callable[
    [
        AsyncIterator[pb.UpdateChunk],
        grpc.aio.ServicerContext,
        Callable[[SubmitHeader], PendingSubmit],
        Callable[[PendingSubmit, str], SubmitResult],
    ],
    Awaitable[SubmitResult],
]

_WANT = {pb.SECAGG_ROSTER: "roster", pb.SECAGG_INBOX: "inbox", pb.SECAGG_UNMASK: "unmask"}
_REFUSALS = (BadUpdate, SubmitRefused, SecAggFailed)


class SecureAggregationRPCs:
    """The secure-aggregation RPCs: validate, delegate to the protocol's "secagg" stage, map."""

    def __init__(self, protocol: RoundProtocol) -> None:
        stage = protocol.stage("secagg")
        self.stage = stage if isinstance(stage, SecAggProtocol) else None

    async def _secure(self, context: grpc.aio.ServicerContext, request: Any) -> SecAggProtocol:
        await check_request(context, request)
        secure = self.stage
        if secure is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this coordinator does not run secure aggregation (fedserver run --secure secagg)",
            )
        return secure  # type: ignore[return-value]

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
        await _check_count(context, len(request.shares), secure.max_peers())
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
        count = len(request.self_mask_shares) + len(request.mask_key_shares)
        await _check_count(context, count, secure.max_peers())
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


async def _check_count(context: grpc.aio.ServicerContext, count: int, most: int) -> None:
    """Refuse a share list longer than the round's selection before looking at its entries."""
    if count > most:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{count} shares sent; this round has {most} selected clients",
        )


class HomomorphicRPCs:
    """The homomorphic-aggregation RPCs: validate, delegate to the protocol's "he" stage, map."""

    def __init__(
        self,
        protocol: RoundProtocol,
        receive: Receive,
        metrics: Metrics,
        chunk_size: int,
        downloads: Downloads,
    ) -> None:
        stage = protocol.stage("he")
        self.stage = stage if isinstance(stage, HEProtocol) else None
        self._receive = receive  # CoordinatorService's stream reader
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.downloads = downloads  # the model's: per-client cap, send slots, stalled writes

    async def SubmitDecryption(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitReply:
        he = await self._he(context)
        result = await self._receive(
            request_iterator, context, he.begin_decryption, he.finish_decryption
        )
        return submit_reply(result)

    async def GetEncryptedAggregate(
        self, request: pb.EncryptedAggregateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await check_request(context, request)
        he = await self._he(context)
        try:
            payload = he.encrypted_aggregate(request.client_id, request.round)
        except SubmitRefused as e:
            await context.abort(status_for(e), str(e))
        # Streamed like the model: counted against the key holder's downloads, a send slot.
        with await self.downloads.open(context, request.client_id):
            header = pb.ModelHeader(
                state=pb.TRAINING,
                round=request.round,
                manifest=manifest_to_proto(he.sum_manifest()),
                total_bytes=payload.size,
                decrypt_round=request.round,
                message=f"encrypted aggregate of round {request.round}",
            )
            await context.write(pb.ModelChunk(header=header))
            await self.downloads.stream(context, framed(payload, self.chunk_size, self.metrics))

    async def _he(self, context: grpc.aio.ServicerContext) -> HEProtocol:
        he = self.stage
        if he is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this coordinator does not run homomorphic aggregation (fedserver run --secure he)",
            )
        return he  # type: ignore[return-value]
