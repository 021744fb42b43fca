"""Model downloads: how many one client identity may have open, how many send bytes at once, and
how long a download whose writes make no progress may keep its send slot.

A GetGlobalModel stream that is sending holds one of `max_sends` send slots: each sending stream
keeps up to a flow-control window of framed chunks in gRPC's buffers, and 10,000 selected clients
pulling together took the coordinator from 190 MB to 1 GB, so the others wait their turn. A
client that opens downloads and stops reading holds its slots while flow control blocks its
writes: with the slots lowered to 4 and a 4 MB model, one identity with a few such streams
stalled every other client's download. Hence, per client identity (the authenticated name, which
the auth interceptor makes equal to the request's client_id), at most `pulls_per_client`
downloads open at once, the next one refused with RESOURCE_EXHAUSTED; and a write that cannot
complete for `stall_timeout` seconds ends the download and frees its slot
(docs/reliability.md, "Limits").
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedcore.tensors import iter_chunks
from fedcore.wire import data_message
from fedserver.state.metrics import Metrics

MAX_CONCURRENT_SENDS = 256
MAX_PULLS_PER_CLIENT = 2
SEND_STALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class DownloadLimits:
    max_sends: int = MAX_CONCURRENT_SENDS  # --max-model-sends
    pulls_per_client: int = MAX_PULLS_PER_CLIENT  # --max-pulls-per-client
    stall_timeout: float = SEND_STALL_TIMEOUT  # --send-stall-timeout

    def __post_init__(self) -> None:
        if self.max_sends < 1:
            raise ValueError("--max-model-sends must be at least 1")
        if self.pulls_per_client < 1:
            raise ValueError("--max-pulls-per-client must be at least 1")
        if not self.stall_timeout > 0:
            raise ValueError("--send-stall-timeout must be more than 0 seconds")


class TooManyPulls(Exception):
    """The client already has `pulls_per_client` downloads open (→ RESOURCE_EXHAUSTED)."""

    reason = "too_many_pulls"


class Stalled(Exception):
    """A write made no progress for `stall_timeout` seconds: the peer stopped reading."""

    reason = "download_stalled"


class Downloads:
    """Shared by every RPC that streams bulk bytes to a client (GetGlobalModel, and under
    --secure he GetEncryptedAggregate); `refuse` counts a refusal by its reason."""

    def __init__(self, limits: DownloadLimits, refuse: Callable[[Exception], object]) -> None:
        self.limits = limits
        self.refuse = refuse
        # Open downloads per client; a client whose count returns to zero leaves the map, so it
        # holds only clients with a download open, not every id that ever pulled.
        self.pulls: Counter[str] = Counter()
        self._senders = asyncio.Semaphore(limits.max_sends)

    def pull(self, client_id: str) -> contextlib.AbstractContextManager[None]:
        """Count one open download of `client_id` until the returned context exits (enter it
        at once); raises TooManyPulls when the client already has `pulls_per_client`."""
        most = self.limits.pulls_per_client
        if self.pulls[client_id] >= most:
            raise TooManyPulls(
                f"client {client_id!r} already has {most} model downloads open (the coordinator's "
                "--max-pulls-per-client); finish or cancel one before pulling again"
            )
        self.pulls[client_id] += 1
        stack = contextlib.ExitStack()
        stack.callback(self._release, client_id)
        return stack

    def _release(self, client_id: str) -> None:
        if self.pulls[client_id] > 1:
            self.pulls[client_id] -= 1
        else:
            del self.pulls[client_id]

    async def send(self, context: grpc.aio.ServicerContext, messages: Iterable[Any]) -> None:
        """Write `messages` holding a send slot (waiting for one first); raises Stalled, with
        the slot given back, when one write cannot complete for `stall_timeout` seconds. The
        next message is asked for only once the previous one was written."""
        timeout = self.limits.stall_timeout
        async with self._senders:
            for message in messages:
                try:
                    # Cancelling a write is safe: gRPC ignores a completion whose waiter is
                    # cancelled, and the stream is ended with a status right after.
                    async with asyncio.timeout(timeout):
                        await context.write(message)
                except TimeoutError:
                    raise Stalled(
                        f"model download stalled: no progress for {timeout:g} s "
                        "(the coordinator's --send-stall-timeout); pull the model again"
                    ) from None

    async def open(
        self, context: grpc.aio.ServicerContext, client_id: str
    ) -> contextlib.AbstractContextManager[None]:
        """`pull` for a handler: a refusal is counted and answered RESOURCE_EXHAUSTED."""
        try:
            return self.pull(client_id)
        except TooManyPulls as e:
            self.refuse(e)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            raise  # unreachable: abort raises

    async def stream(self, context: grpc.aio.ServicerContext, messages: Iterable[Any]) -> None:
        """`send` for a handler: a stalled download (its send slot already free again) is
        counted and ended with DEADLINE_EXCEEDED; if the peer is gone, gRPC ends the call as
        cancelled (fedserver/transport/rpc.py BoundedContext). One log line either way."""
        try:
            await self.send(context, messages)
        except Stalled as e:
            self.refuse(e)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))


def framed(
    buffer: Any, chunk_size: int, metrics: Metrics, shared: FramedWindow | None = None
) -> Iterator[bytes]:
    """Data messages framed straight from `buffer`: one copy per chunk into a ready-to-send
    message (gRPC copies it once more into its send buffer), no protobuf round trips; with
    `shared`, a chunk another download just framed is sent as it is. A chunk is counted as
    sent when the next one is asked for, that is once its write completed."""
    for index, chunk in enumerate(iter_chunks(buffer, chunk_size)):
        yield shared.frame(buffer, index, chunk) if shared is not None else data_message(chunk)
        metrics.sent(len(chunk))


FRAMED_WINDOW = 32  # chunks: 32 MiB at the default chunk size


class FramedWindow:
    """The global model's last framed chunks, shared by its downloads: a round's clients pull
    the same model at about the same pace, so each chunk is framed (copied) once for all of
    them, not once each. Memory is `size` chunks, not a second model (which caching every
    framed chunk per version would cost, against the coordinator's 2 x model bound); a download
    that fell more than `size` chunks behind frames its own. Event-loop only: no lock."""

    def __init__(self, size: int = FRAMED_WINDOW) -> None:
        self.size = size
        self._of: weakref.ref[Any] | None = None  # the buffer framed: not kept alive by us
        self._frames: OrderedDict[int, bytes] = OrderedDict()

    def frame(self, buffer: Any, index: int, chunk: memoryview) -> bytes:
        if self._of is None or self._of() is not buffer:
            self._of, self._frames = weakref.ref(buffer), OrderedDict()
        message = self._frames.get(index)
        if message is None:
            message = self._frames[index] = data_message(chunk)
            if len(self._frames) > self.size:
                self._frames.popitem(last=False)
        return message
