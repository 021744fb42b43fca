"""Who is still there: expiring silent clients on time, heartbeats, reported failures, and the
warnings that name the clients a round stopped waiting for.

A client is live while it was heard from in the last `--client-timeout` seconds (any RPC, or a
Heartbeat that a client sends every timeout / 3 while it trains or evaluates). The round machine
(rounds.py) expires clients lazily, when asked; this module also wakes it when the least
recently seen client is due to expire, so a round whose selected clients all died stops waiting
for them even if nobody else calls. No gRPC here: the servicer calls `heartbeat` and `failed`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

from fedcore.limits import excerpt
from fedserver.rounds.synchronous import RoundMachine

log = logging.getLogger("fedserver")

# Never re-check expiry more often than this, whatever the clients' timing.
MIN_SWEEP_SECONDS = 0.25
# Names listed in one warning; the rest are counted.
MAX_NAMED = 10


def name_some(clients: Sequence[str]) -> str:
    shown = ", ".join(clients[:MAX_NAMED])
    more = len(clients) - MAX_NAMED
    return f"{shown} and {more} more" if more > 0 else shown


class LivenessWatch:
    def __init__(
        self,
        machine: RoundMachine,
        clock: Callable[[], float],
        advance: Callable[[], None],
        total_rounds: int,
    ) -> None:
        self.machine = machine
        self.clock = clock
        self.advance = advance
        self.total_rounds = total_rounds
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def timeout(self) -> float:
        return self.machine.policy.client_ttl

    def heartbeat_interval(self) -> float:
        """What JoinReply.heartbeat_seconds tells clients: three tries per timeout."""
        return self.timeout / 3

    # ------------------------------------------------------------------ events
    def heartbeat(self, client_id: str) -> bool:
        """A client is at work; False if it is not live (it should Join again)."""
        return self.machine.renew(client_id)

    def failed(self, client_id: str, round_number: int, reason: str) -> bool:
        """The client says its Task failed and it is exiting: not live any more, and the open
        round stops waiting for it. False (nothing logged) if it was not live: a caller that
        never joined cannot fill the log."""
        if not self.machine.is_live(client_id):
            return False
        awaited = self.machine.depart(client_id)
        during = f" in round {round_number}" if round_number else ""
        then = f"round {self.machine.round} stops waiting for it" if awaited else "not live"
        log.warning("client %s failed%s and left: %s; %s", client_id, during, excerpt(reason), then)
        self.advance()
        return True

    def after_step(self, action: str | None) -> None:
        """Log what the round machine noticed, and keep the expiry timer armed."""
        m = self.machine
        if m.lapsed:
            lapsed, m.lapsed = m.lapsed, []
            log.warning(
                "round %d: nothing heard for %.0fs (--client-timeout) from selected client(s) "
                "%s: no longer live; the round stops waiting for them",
                m.round,
                self.timeout,
                name_some(lapsed),
            )
        if action in ("close", "reopened", "exhausted") and m.missed:
            missed, m.missed = m.missed, []
            log.warning(
                "round %d/%d %s: no update from %d of %d selected client(s): %s",
                m.round,
                self.total_rounds,
                "deadline passed"
                if m.missed_deadline
                else "every selected client left or went silent",
                len(missed),
                len(m.selected) if action != "reopened" else len(missed) + len(m.receipts),
                name_some(missed),
            )
        if action == "reopened" and len(m.selected) <= len(m.receipts):
            left = m.policy.max_attempts - m.attempts
            log.warning(
                "round %d re-opened with nobody to ask: no live client without an update "
                "(%d live); %d more attempt(s) before the coordinator gives up",
                m.round,
                m.live_count(),
                left,
            )
        self._arm()

    def _arm(self) -> None:
        if self._sweep is not None:
            return
        due = self.machine.next_expiry()
        if not math.isfinite(due):
            return  # nobody live: the next call (which makes someone live) arms it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # driven without an event loop (unit tests): expiry stays lazy
        delay = max(MIN_SWEEP_SECONDS, due - self.clock() + 0.01)
        self._sweep = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._sweep = None
        self.advance()  # the machine expires whoever is due, and re-arms through after_step

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
