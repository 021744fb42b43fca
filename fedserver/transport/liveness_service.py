"""The liveness RPCs (Heartbeat, ReportFailure): validate, delegate to LivenessWatch, refuse.

CoordinatorService (service.py) owns one and forwards to it, as it does for the protocol stages
(secure_service.py). Both RPCs are refused with FAILED_PRECONDITION for a client that is not
live, so only a joined client can keep itself live or leave, and a stranger cannot fill the log.
"""

from __future__ import annotations

import grpc

from fedcore.proto import coordinator_pb2 as pb
from fedserver.coordinator.liveness import LivenessWatch
from fedserver.transport.rpc import check_request

NOT_LIVE = "client is not live (never joined, or not heard from for --client-timeout); Join again"


class LivenessRPCs:
    def __init__(self, liveness: LivenessWatch) -> None:
        self.liveness = liveness

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        await check_request(context, request)
        if not self.liveness.heartbeat(request.client_id):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_LIVE)
        return pb.HeartbeatReply(live=True)

    async def ReportFailure(
        self, request: pb.FailureReport, context: grpc.aio.ServicerContext
    ) -> pb.FailureReply:
        await check_request(context, request)
        if not self.liveness.failed(request.client_id, request.round, request.reason):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_LIVE)
        return pb.FailureReply(message="failure recorded; the client is no longer live")
