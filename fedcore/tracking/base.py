"""What a tracking backend does, and the background dispatcher that keeps it off the caller's
path: a bounded queue drained by one thread, retried with backoff while the backend is
unreachable. A federation never waits for, or fails because of, its experiment tracker."""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fedcore.tracking")

QUEUE_LIMIT = 10_000  # events held while a tracker is unreachable; the oldest go first
MAX_BACKOFF = 30.0  # seconds between tries while unreachable


@dataclass
class RunInfo:
    """Who the run is: its name, tags and parameters, and an earlier run to continue."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None  # continue this run (a resumed state dir)


class Backend(ABC):
    """One tracking target. Every method may raise: the dispatcher retries it later."""

    target: str  # the --track value, for log lines

    @abstractmethod
    def open(self, run: RunInfo) -> str:
        """Create the run, or continue run.run_id (or one found by run.tags); its id."""

    @abstractmethod
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    @abstractmethod
    def log_artifact(self, path: Path) -> None: ...

    @abstractmethod
    def close(self, status: str) -> None:
        """End the run: status is "finished", "failed" or "stopped"."""


@dataclass(frozen=True)
class Metrics:
    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class Artifact:
    path: Path


Event = Metrics | Artifact


class Dispatcher:
    """Feeds one Backend from a bounded queue in its own daemon thread.

    `log_metrics` and `log_artifact` never block and never raise. While the backend fails, the
    thread retries the same event with full-jitter exponential backoff; one WARNING per outage
    and one INFO when it is back. A full queue drops its oldest event, counted and logged."""

    def __init__(
        self,
        backend: Backend,
        run: RunInfo,
        on_open: Callable[[str], None] | None = None,
        limit: int = QUEUE_LIMIT,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.backend = backend
        self.run = run
        self.on_open = on_open  # told the run id once the run exists (stored for a resume)
        self.run_id: str | None = None
        self.max_backoff = max_backoff
        self._queue: deque[Event] = deque()
        self._limit = limit
        self._cond = threading.Condition()
        self._closing = False
        self._status = "finished"
        self.dropped = 0
        self._dropped_logged = 0
        self._outage = False
        self._abandoned = False  # close() gave up: the thread stops at its next turn
        self._thread = threading.Thread(
            target=self._loop, name=f"tracking {backend.target}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self._put(Metrics(step, dict(metrics)))

    def log_artifact(self, path: Path) -> None:
        self._put(Artifact(Path(path)))

    def _put(self, event: Event) -> None:
        with self._cond:
            if self._closing:
                return
            if len(self._queue) >= self._limit:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(event)
            self._cond.notify()

    def begin_close(self, status: str = "finished") -> None:
        """Take no more events; the thread flushes the queue, then ends the run as `status`."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._status = status
            self._cond.notify()

    def close(self, status: str = "finished", timeout: float = 10.0) -> bool:
        """Flush what is queued and end the run, waiting at most `timeout` seconds; True when
        everything reached the backend. What is left is logged, never waited for."""
        self.begin_close(status)
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                left = len(self._queue)
                self._queue.clear()
                self._abandoned = True
            log.warning(
                "tracking %s: gave up after %.0fs with %d event(s) not delivered",
                self.backend.target,
                timeout,
                left,
            )
            return False
        return True

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                if self._abandoned:
                    return
                while not self._queue and not self._closing:
                    self._cond.wait()
                event = self._queue[0] if self._queue else None
                closing = self._closing
                self._report_drops()
            try:
                if self.run_id is None:
                    self.run_id = self.backend.open(self.run)
                    log.info("tracking %s: run %s", self.backend.target, self.run_id)
                    if self.on_open is not None:
                        self.on_open(self.run_id)
                if event is None:  # closing and drained
                    self.backend.close(self._status)
                    self._recovered()
                    return
                self._deliver(event)
            except Exception as e:  # any failure of a tracker: retry, never stop the caller
                self._failed(e)
                with self._cond:
                    # Closing: close() bounds the wait; until then keep trying.
                    self._cond.wait(random.uniform(0, delay))
                delay = min(self.max_backoff, delay * 2)
                continue
            delay = 0.5
            self._recovered()
            if event is not None:
                with self._cond:
                    if self._queue and self._queue[0] is event:
                        self._queue.popleft()
            elif closing:
                return

    def _deliver(self, event: Event) -> None:
        if isinstance(event, Metrics):
            self.backend.log_metrics(event.step, event.values)
        else:
            self.backend.log_artifact(event.path)

    def _failed(self, e: Exception) -> None:
        if not self._outage:
            self._outage = True
            self._since = time.monotonic()
            log.warning(
                "tracking %s unreachable (%s); training goes on, retrying in the background",
                self.backend.target,
                _short(e),
            )
        else:
            log.debug("tracking %s still failing: %s", self.backend.target, _short(e))

    def _recovered(self) -> None:
        if self._outage:
            self._outage = False
            log.info(
                "tracking %s reachable again after %.0fs",
                self.backend.target,
                time.monotonic() - self._since,
            )

    def _report_drops(self) -> None:
        if self.dropped > self._dropped_logged:
            log.warning(
                "tracking %s: queue full (%d events), %d oldest dropped so far",
                self.backend.target,
                self._limit,
                self.dropped,
            )
            self._dropped_logged = self.dropped


def _short(e: Exception) -> str:
    """The first line of an exception, bounded: MLflow's can carry a whole HTTP body."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
