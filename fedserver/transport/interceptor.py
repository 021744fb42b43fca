"""Server interceptors that wrap each method's handler once, not on every call.

gRPC asks the interceptors for a handler on every call. Our wrappers (bounded replies, lenient
decoding, authentication) depend only on the method, so each is built on a method's first call
and kept: a later call costs one dict lookup, and the outermost interceptor answers it without
running the inner ones (their wrapping is already inside the cached handler). In a storm of
10,000 Joins and long-polls, building the wrappers per call was ~7% of the event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

import grpc


class WrapOnce(grpc.aio.ServerInterceptor):
    """Subclasses say how to wrap a handler; this caches the result per method."""

    def __init__(self) -> None:
        # Keyed by the methods the server has (continuation found a handler), never by names a
        # client made up: an unknown method is answered UNIMPLEMENTED and not remembered.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    @abc.abstractmethod
    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler to serve `method` with, built from the server's own `handler`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = self.wrap(handler, method)
        return wrapped
