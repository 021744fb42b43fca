"""Staying live while busy, and saying goodbye on a crash (docs/reliability.md, "Liveness").

The coordinator forgets a client it has not heard from for --client-timeout seconds. Polls and
uploads count, but local training makes no call for as long as it takes, so while training or
evaluating a background thread sends a Heartbeat every JoinReply.heartbeat_seconds (a third of
the timeout). When the user's Task raises, the client reports the failure before it exits, so
the coordinator stops waiting for it at once instead of at the round's deadline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

import grpc

from fedcore.limits import MAX_STRING
from fedcore.proto import coordinator_pb2 as pb

log = logging.getLogger("fedclient")

# A failure report is best effort on the way out: never hold the exit up for long.
REPORT_TIMEOUT = 5.0


class Heartbeat:
    """`with Heartbeat(...)`: a daemon thread sends Heartbeat every `interval` seconds until the
    block ends. Interval 0 (a coordinator without the RPC) sends nothing."""

    def __init__(
        self,
        send: Callable[..., pb.HeartbeatReply],
        client_id: str,
        round_number: int,
        interval: float,
        wait: Callable[[threading.Event, float], bool] = threading.Event.wait,
    ) -> None:
        self.send = send
        self.request = pb.HeartbeatRequest(client_id=client_id, round=round_number)
        self.interval = interval
        self.wait = wait  # tests replace it to step the thread without sleeping
        self.done = threading.Event()
        self.sent = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.done.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self.wait(self.done, self.interval):
            try:
                self.send(self.request, timeout=self.interval)
                self.sent += 1
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code is grpc.StatusCode.UNIMPLEMENTED:
                    return  # an older coordinator: nothing to keep alive with
                # Not live any more, or the link is down: the upload that follows says how it
                # went (and rejoins); a heartbeat only ever helps.
                log.debug("heartbeat not delivered (%s: %s)", code.name, e.details())  # type: ignore[attr-defined]


def report_failure(
    send: Callable[..., pb.FailureReply], client_id: str, round_number: int, error: BaseException
) -> None:
    """Tell the coordinator this client is exiting because its Task raised `error` (best
    effort: a coordinator that is unreachable, or too old to know the RPC, learns it from the
    client's silence instead)."""
    reason = f"{type(error).__name__}: {error}"[:MAX_STRING]
    try:
        send(
            pb.FailureReport(client_id=client_id, round=round_number, reason=reason),
            timeout=REPORT_TIMEOUT,
        )
    except grpc.RpcError as e:
        log.debug("could not report the failure (%s)", e.code().name)  # type: ignore[attr-defined]
        return
    log.info("told the coordinator that this client failed (%s)", reason)
