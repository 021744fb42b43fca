"""The operating-system limits a coordinator with thousands of connections runs into, its
garbage collector's settings for them, and the connection limits it sets itself (gRPC's queue
of calls not yet picked up, model downloads: fedserver/transport/downloads.py) with their flags.

Every connected client holds one TCP connection, that is one file descriptor, for as long as it
waits. Many systems default to 1,024 open files per process (`ulimit -n`), so the coordinator
raises its soft limit to the hard limit at start-up and warns, in the log and as Prometheus
gauges (fedgrpc_open_files, fedgrpc_open_files_limit), when it comes near it. Past the limit
accept() fails and new clients see UNAVAILABLE while connected ones are unaffected.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from fedserver.transport.downloads import (
    MAX_CONCURRENT_SENDS,
    MAX_PULLS_PER_CLIENT,
    SEND_STALL_TIMEOUT,
    DownloadLimits,
)

log = logging.getLogger("fedserver")

NEAR_LIMIT = 0.8  # warn at this fraction of the open-files limit

try:
    import resource
except ImportError:  # not POSIX: nothing to raise or watch
    resource = None  # type: ignore[assignment]


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force
    (0 when unknown)."""
    if resource is None:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, e)
    if soft != resource.RLIM_INFINITY:
        log.info(
            "open-files limit %d: room for about %d connected clients "
            "(raise the hard limit, `ulimit -Hn` / LimitNOFILE=, for more)",
            soft,
            max(0, soft - 64),
        )
    return 0 if soft == resource.RLIM_INFINITY else int(soft)


def tune_garbage_collector() -> None:
    """Collect less often, and never re-scan what start-up loaded (call it once start-up is done).

    Every RPC allocates a few dozen short-lived container objects (tasks, futures, frames); at
    the default threshold (700) a storm of 10,000 Joins and polls ran a collection every few
    calls, each also walking the long-lived objects of start-up (modules, the model, the task)
    and of the connected clients: 7% of the event loop in a 10,000-client storm. Freezing moves
    start-up's objects out of every collection; the higher threshold lets young garbage (a few
    MB at most) wait a little longer.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def open_files() -> int:
    """File descriptors this process holds (0 when /proc is not available)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class OpenFilesWatch:
    """Logs once each time the process crosses NEAR_LIMIT of its open-files limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.near = False
        self.count = 0

    def check(self) -> int:
        self.count = open_files()
        near = bool(self.limit) and self.count >= NEAR_LIMIT * self.limit
        if near and not self.near:
            log.warning(
                "%d open files of a limit of %d: new connections will soon be refused; "
                "raise the open-files limit (docs/performance.md, Connections)",
                self.count,
                self.limit,
            )
        elif self.near and not near:
            log.info("open files back to %d of %d", self.count, self.limit)
        self.near = near
        return self.count


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


def add_limit_arguments(
    run: argparse.ArgumentParser,
    positive_int: Callable[[str], int],
    positive_float: Callable[[str], float],
) -> None:
    """The flags of the limits above and of fedserver/transport/downloads.py (docs/reliability.md),
    checked by run_cli's converters like every other flag."""
    g = run.add_argument_group("connection limits (docs/reliability.md, Limits)")
    g.add_argument(
        "--max-queued-calls",
        type=positive_int,
        default=MAX_QUEUED_CALLS,
        help="calls gRPC holds before the coordinator picks them up (and before "
        f"authentication); beyond this new calls are refused ({MAX_QUEUED_CALLS})",
    )
    g.add_argument(
        "--queued-call-timeout",
        type=positive_int,
        default=QUEUED_CALL_TIMEOUT,
        metavar="SECONDS",
        help=f"a call queued this long is refused; the client retries ({QUEUED_CALL_TIMEOUT})",
    )
    g.add_argument(
        "--max-model-sends",
        type=positive_int,
        default=MAX_CONCURRENT_SENDS,
        help="model downloads sending bytes at once; the others wait their turn "
        f"({MAX_CONCURRENT_SENDS})",
    )
    g.add_argument(
        "--max-pulls-per-client",
        type=positive_int,
        default=MAX_PULLS_PER_CLIENT,
        help="model downloads (GetGlobalModel) one client may have open at once; more are "
        f"refused with RESOURCE_EXHAUSTED ({MAX_PULLS_PER_CLIENT})",
    )
    g.add_argument(
        "--send-stall-timeout",
        type=positive_float,
        default=SEND_STALL_TIMEOUT,
        metavar="SECONDS",
        help="a model download whose next chunk cannot be written for this long (the client "
        f"stopped reading) is ended and its send slot freed ({SEND_STALL_TIMEOUT:g})",
    )


def limits_from_args(args: argparse.Namespace) -> tuple[CallQueue, DownloadLimits]:
    """Raises ValueError (a usage error) for a limit out of range."""
    return CallQueue(args.max_queued_calls, args.queued_call_timeout), DownloadLimits(
        args.max_model_sends, args.max_pulls_per_client, args.send_stall_timeout
    )
