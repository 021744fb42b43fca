"""The operating-system limits a coordinator with thousands of connections runs into, and its
garbage collector's settings for them.

Every connected client holds one TCP connection, that is one file descriptor, for as long as it
waits. Many systems default to 1,024 open files per process (`ulimit -n`), so the coordinator
raises its soft limit to the hard limit at start-up and warns, in the log and as Prometheus
gauges (fedgrpc_open_files, fedgrpc_open_files_limit), when it comes near it. Past the limit
accept() fails and new clients see UNAVAILABLE while connected ones are unaffected.
"""

from __future__ import annotations

import gc
import logging
import os

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
