"""Long-poll waiters, by client: wake only the clients whose answer changed, or everyone.

Thousands of clients wait in GetGlobalModel while a hundred train. When a round opens only the
selected clients' answer changes, so only they are woken; waking all N pollers to re-check an
unchanged answer cost O(N) Python work per round change (a wake-up storm of 10,000 coroutines on
the event loop that also receives updates). A waiter is one future and one timer handle, no
Task (asyncio.wait_for makes a Task per wait).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Wakeups:
    def __init__(self) -> None:
        # A client may have more than one poll open (a retry racing its predecessor).
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    async def wait(self, client_id: str, timeout: float) -> None:
        """Until this client is woken or `timeout` seconds pass. Register-then-await happens
        without yielding, so a caller that checked its answer just before cannot miss a wake."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters = self._waiting.setdefault(client_id, set())
        waiters.add(waiter)
        timer = loop.call_later(max(0.0, timeout), _release, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            waiters.discard(waiter)
            if not waiters and self._waiting.get(client_id) is waiters:
                del self._waiting[client_id]

    def wake(self, clients: Iterable[str]) -> None:
        """Wake these clients' polls (O(len(clients)))."""
        for client_id in clients:
            for waiter in self._waiting.get(client_id, ()):
                _release(waiter)

    def wake_all(self) -> None:
        """Something that concerns every client changed (finished, shutting down, evaluation)."""
        for waiters in self._waiting.values():
            for waiter in waiters:
                _release(waiter)
