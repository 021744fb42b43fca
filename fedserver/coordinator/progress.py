"""The coordinator's progress: at a terminal a bar (updates received of expected, and time to
the deadline); otherwise a log line every WAITING_LOG_EVERY seconds while it waits for clients,
so a quiet log file is not mistaken for a hang."""

from __future__ import annotations

import asyncio
import logging
import math

from fedcore.progress import live_progress
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.rounds.synchronous import Phase

REFRESH_SECONDS = 0.5
WAITING_LOG_EVERY = 10.0
log = logging.getLogger("fedserver")


async def log_waiting(coordinator: Coordinator, every: float = WAITING_LOG_EVERY) -> None:
    """Without a bar: `round 1/3: waiting for clients: 1/3 live` every `every` s while the
    coordinator waits for --min-clients; silent while rounds run (they log their own lines)."""
    while True:
        await asyncio.sleep(every)
        m = coordinator.machine
        if coordinator.state_name() == "waiting_for_clients":
            log.info(
                "round %d/%d: waiting for clients: %d/%d live",
                m.round,
                coordinator.policy.total_rounds,
                m.live_count(),
                coordinator.policy.min_clients,
            )


async def show_progress(coordinator: Coordinator) -> None:
    """Redraw until cancelled; a no-op loop is never started when stderr is not a terminal."""
    with live_progress(True) as progress:
        assert progress is not None
        bar = progress.add_task("starting", total=1, detail="")
        while True:
            m = coordinator.machine
            total = coordinator.policy.total_rounds
            if m.phase is Phase.WAITING:
                live = m.live_count()
                description = f"round {m.round}/{total}"
                detail = f"waiting for clients: {live}/{coordinator.policy.min_clients} live"
                done, expected = 0, max(1, len(m.selected))
            elif coordinator.state_name() == "finished":
                description, detail = f"finished {m.rounds_completed}/{total}", ""
                done = expected = 1
            else:
                left = m.deadline - m.clock()  # the machine's: a simulated fleet's, if any
                shown = f"deadline in {left:.0f}s" if math.isfinite(left) and left > 0 else ""
                description = f"round {m.round}/{total} updates"
                detail = "aggregating" if m.phase is Phase.AGGREGATING else shown
                done, expected = len(m.receipts), max(1, m.expected_updates)
            progress.update(
                bar, description=description, completed=done, total=expected, detail=detail
            )
            await asyncio.sleep(REFRESH_SECONDS)
