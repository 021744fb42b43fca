"""Register the Coordinator servicer with gRPC, with copy-free serializers for the bulk RPCs."""

from __future__ import annotations

import grpc

from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.wire import parse_update_chunk, serialize_message
from fedserver.transport.service import CoordinatorService


def add_to_server(service: CoordinatorService, server: grpc.aio.Server) -> None:
    """Register the service like the generated add_CoordinatorServicer_to_server, with
    serializers swapped for copy-free ones: GetGlobalModel and GetEncryptedAggregate may yield
    pre-serialized bytes, and SubmitUpdate's and SubmitDecryption's data chunks are delivered as
    views of the received message. Every other RPC
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
    for name in ("GetGlobalModel", "GetEncryptedAggregate"):
        handlers[name] = handlers[name]._replace(  # type: ignore[attr-defined]
            response_serializer=serialize_message
        )
    for name in ("SubmitUpdate", "SubmitDecryption"):
        handlers[name] = handlers[name]._replace(  # type: ignore[attr-defined]
            request_deserializer=parse_update_chunk
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.name, handlers),))
    server.add_registered_method_handlers(capture.name, handlers)
