"""Join log lines that stay readable, and cheap, when thousands of clients join at once.

A small federation wants one line per Join. A storm of 10,000 Joins (a coordinator restart)
wrote 10,000 lines, each a format and a write on the event loop that was admitting them, and
a log nobody can read. The first LINES_PER_INTERVAL Joins of an interval are logged one by one
at INFO, the rest at DEBUG, and one INFO line counts those when the interval ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from fedcore.limits import excerpt

log = logging.getLogger("fedserver.service")
INTERVAL = 10.0
LINES_PER_INTERVAL = 20


class JoinLog:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL,
        lines: int = LINES_PER_INTERVAL,
    ) -> None:
        self.clock, self.interval, self.lines = clock, interval, lines
        self.count = 0  # Joins in the current interval
        self.until = 0.0  # when it ends (an interval starts with the first Join after one)

    def joined(
        self, client_id: str, peer: Callable[[], str], properties: Mapping[str, str]
    ) -> None:
        now = self.clock()
        if now >= self.until:
            self.flush(now)
            self.until = now + self.interval
        self.count += 1
        level = logging.INFO if self.count <= self.lines else logging.DEBUG
        if log.isEnabledFor(level):  # the peer and the excerpt only when the line is written
            props = excerpt(properties) if properties else "-"
            log.log(level, "client %s joined from %s (%s)", client_id, peer(), props)

    def flush(self, now: float | None = None) -> None:
        """Count the Joins not logged at INFO once their interval is over (called by the next
        Join and periodically, so the last burst of a storm is counted too)."""
        if now is None:
            now = self.clock()
        if now < self.until:
            return
        if self.count > self.lines:
            log.info(
                "%d more client(s) joined within %.0f s (one line each at DEBUG)",
                self.count - self.lines,
                self.interval,
            )
        self.count = 0
