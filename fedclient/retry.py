"""How a client rides out failures: which gRPC codes are worth retrying, full-jitter backoff
with a give-up budget, and the two ways a session ends early."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

# Worth retrying: the coordinator is down, restarting, busy or the link dropped.
# RESOURCE_EXHAUSTED is not: it means the update is too large, which a retry cannot fix.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


# gRPC's own reconnect backoff grows to 120 s; capped at 2 s (+-20% jitter) a client notices a
# restarted coordinator within seconds, and the jitter still spreads a crowd of clients out.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Subchannels of its own: a channel opened to replace a stuck one (session._join) would
    # otherwise get the stuck subchannel back from gRPC's process-wide pool (same target, same
    # arguments), hanging connection attempt and all.
    ("grpc.use_local_subchannel_pool", 1),
)
JOIN_TIMEOUT = 30.0
# While the coordinator cannot be reached at all: try again within 2 s (gRPC's own reconnect
# pace, so no extra load) and say so with the address every 5 s.
UNREACHABLE_RETRY = 2.0
REPORT_EVERY = 5.0
# Trailing metadata of an UNAVAILABLE refusal: how long the coordinator asks us to stay away.
RETRY_AFTER_KEY = "retry-after-ms"


class PermanentError(RuntimeError):
    """The coordinator refused us for a reason retrying cannot fix."""


class Misconfigured(PermanentError):
    """This client's settings can never work with the coordinator (TLS mismatch): the message
    says what to change."""


class Stopped(RuntimeError):
    """Ctrl-C / SIGTERM: abandon the round."""


@dataclass
class Backoff:
    """Full-jitter exponential backoff (AWS architecture blog), with a give-up budget."""

    initial: float = 0.5
    maximum: float = 10.0
    give_up_after: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    failing_since: float | None = None

    def next_delay(self, at_least: float = 0.0) -> float:
        """The next wait; `at_least` is the coordinator's retry-after, which becomes a floor
        jittered over [at_least, 2 * at_least) so a refused crowd does not return at once."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since > self.give_up_after:
            raise TimeoutError
        delay = self.rng.uniform(0, min(self.maximum, self.initial * 2**self.attempt))
        self.attempt += 1
        if at_least > 0:
            delay = max(delay, self.rng.uniform(at_least, 2 * at_least))
        return delay

    def reset(self) -> None:
        self.attempt = 0
        self.failing_since = None


def retry_after(error: grpc.RpcError) -> float:
    """Seconds the coordinator asked us to wait (trailing metadata retry-after-ms), or 0."""
    trailing = getattr(error, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # a channel-level failure may carry no call to read metadata from
        metadata = None
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, min(float(value) / 1000, 300.0))
            except (TypeError, ValueError):
                return 0.0
    return 0.0
