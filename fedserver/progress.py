"""The coordinator's progress bar: updates received of expected, and time to the deadline."""

from __future__ import annotations

import asyncio
import math
import time

from fedcore.progress import live_progress
from fedserver.coordinator import Coordinator
from fedserver.rounds import Phase

REFRESH_SECONDS = 0.5


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
                left = m.deadline - time.monotonic()
                shown = f"deadline in {left:.0f}s" if math.isfinite(left) and left > 0 else ""
                description = f"round {m.round}/{total} updates"
                detail = "aggregating" if m.phase is Phase.AGGREGATING else shown
                done, expected = len(m.receipts), max(1, len(m.selected))
            progress.update(
                bar, description=description, completed=done, total=expected, detail=detail
            )
            await asyncio.sleep(REFRESH_SECONDS)
