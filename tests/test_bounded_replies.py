"""The safety nets under every handler, alone (no coordinator): status messages and log records
quoting client input are cut to fedcore/limits.py's caps, whatever a handler does."""

from __future__ import annotations

import asyncio
import logging
import sys

import grpc

from fedcore import limits
from fedcore.logs import ClipMessages
from fedserver.transport.rpc import UNEXPECTED, BoundedReplies


def test_no_status_message_escapes_the_cap() -> None:
    """A handler that aborts with, or raises, a mebibyte of text: the client sees the right
    code and at most MAX_REFUSAL_MESSAGE bytes (BoundedReplies wraps every handler)."""
    huge = "y" * (1 << 20)

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, huge)
        return b""

    async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ValueError(huge)

    async def crash_stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        yield b""
        raise ValueError(huge)

    handlers = {
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
        "Crash": grpc.unary_unary_rpc_method_handler(crash),
        "CrashStream": grpc.unary_stream_rpc_method_handler(crash_stream),
    }

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        server = grpc.aio.server(interceptors=[BoundedReplies()])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for name in ("Refuse", "Crash"):
                    try:
                        await channel.unary_unary(f"/t.T/{name}")(b"", timeout=30)
                    except grpc.aio.AioRpcError as e:
                        out.append((e.code(), e.details() or ""))
                try:
                    async for _ in channel.unary_stream("/t.T/CrashStream")(b"", timeout=30):
                        pass
                except grpc.aio.AioRpcError as e:
                    out.append((e.code(), e.details() or ""))
        finally:
            await server.stop(None)
        return out

    got = asyncio.run(scenario())
    assert [code for code, _ in got] == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNKNOWN,
    ]
    assert all(len(details.encode()) <= limits.MAX_REFUSAL_MESSAGE for _, details in got)
    assert got[1][1] == got[2][1] == UNEXPECTED


def test_log_records_are_clipped() -> None:
    clip = ClipMessages()
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "joined %s", ("p" * 10**6,), None)
    clip.filter(record)
    assert len(record.getMessage()) < limits.MAX_LOG_MESSAGE + 100
    try:
        raise ValueError("q" * 10**6)
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    clip.filter(record)
    assert record.exc_text is not None and len(record.exc_text) < 3 * limits.MAX_LOG_MESSAGE
