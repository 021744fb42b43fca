"""gRPC's queue of calls not yet picked up (--max-queued-calls,
--queued-call-timeout): plain settings, flags in transport/limits.py."""

from __future__ import annotations

from dataclasses import dataclass

# Calls that reached gRPC but that the event loop has not picked up yet wait in gRPC core's
# queue, before any interceptor (authentication included) sees them. gRPC's defaults (cancel at
# random beyond 1,000, all beyond 3,000, any older than 30 s) broke a storm of 10,000 Joins
# (docs/performance.md, Connections); 1M calls for an hour let anyone who reaches the port park
# a million unauthenticated calls. Twice the largest federation measured, for two minutes.
MAX_QUEUED_CALLS = 20_000


QUEUED_CALL_TIMEOUT = 120


@dataclass(frozen=True)
class CallQueue:
    max_calls: int = MAX_QUEUED_CALLS  # --max-queued-calls
    max_seconds: int = QUEUED_CALL_TIMEOUT  # --queued-call-timeout

    def __post_init__(self) -> None:
        if self.max_calls < 1:
            raise ValueError("--max-queued-calls must be at least 1")
        if self.max_seconds < 1:
            raise ValueError("--queued-call-timeout must be at least 1 second")

    def server_options(self) -> tuple[tuple[str, int], ...]:
        return (
            ("grpc.server.max_pending_requests", self.max_calls),
            ("grpc.server.max_pending_requests_hard_limit", self.max_calls),
            ("grpc.server_max_unrequested_time_in_server", self.max_seconds),
        )
