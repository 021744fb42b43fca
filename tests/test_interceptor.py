"""WrapOnce: each method's handler is wrapped on its first call and reused after."""

from __future__ import annotations

import asyncio

import grpc

from fedserver.transport.interceptor import WrapOnce


class Details:
    def __init__(self, method: str) -> None:
        self.method = method


class Tagging(WrapOnce):
    def __init__(self) -> None:
        super().__init__()
        self.wrapped: list[str] = []

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        self.wrapped.append(method)
        return handler._replace(request_deserializer=None)  # type: ignore[attr-defined]


def test_a_method_is_wrapped_once_and_unknown_methods_are_not_remembered() -> None:
    async def known(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(known, request_deserializer=bytes)
    looked_up: list[str] = []

    async def continuation(details: Details) -> grpc.RpcMethodHandler | None:
        looked_up.append(details.method)
        return handler if details.method == "/svc/Known" else None

    interceptor = Tagging()

    async def call(method: str) -> grpc.RpcMethodHandler | None:
        return await interceptor.intercept_service(continuation, Details(method))  # type: ignore[arg-type]

    async def scenario() -> None:
        first, second = await call("/svc/Known"), await call("/svc/Known")
        assert first is second and first is not handler
        assert first.request_deserializer is None and first.unary_unary is known
        for i in range(3):
            assert await call(f"/svc/Made-up-{i}") is None

    asyncio.run(scenario())
    assert interceptor.wrapped == ["/svc/Known"]
    assert looked_up == ["/svc/Known", *(f"/svc/Made-up-{i}" for i in range(3))]
    assert list(interceptor._wrapped) == ["/svc/Known"]
