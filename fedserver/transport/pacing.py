"""Hand out the model no faster than the uploads it causes can be read.

A selected client uploads as soon as it has trained; a 40 kB update takes milliseconds. With
10,000 clients selected, models went out faster than the event loop read the uploads that came
back, and every upload waiting for the loop sat in gRPC's buffers with its data: the coordinator
went from 540 MB (connections) to 1 GB. The upload cannot be held back on its way in without
a stream window smaller than an update (which slows large models, and makes aio clients see a
refused upload as INTERNAL: grpc/grpc#36066), so the model is held back instead: once `limit`
clients have been sent this round's model and not yet started their upload, the next model send
waits (first come, first served) until one does. A client that vanished after its download
must not stall the round: a send waits at most `max_wait` seconds, and a new round starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

MAX_UPLOADS_OWED = 2048  # twice submissions.MAX_UPLOADS_IN_FLIGHT: the loop never runs dry
MAX_WAIT = 30.0


class UploadPacer:
    def __init__(self, limit: int = MAX_UPLOADS_OWED, max_wait: float = MAX_WAIT) -> None:
        self.limit, self.max_wait = limit, max_wait
        self.round = 0
        self.owed: set[str] = set()  # sent this round's model, upload not started yet
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def before_send(self, client_id: str, round_number: int) -> None:
        """Return when the model may go out to `client_id` for training in `round_number`."""
        if round_number != self.round:
            self.round = round_number
            self.owed.clear()
            self._wake(len(self._waiters))
        if len(self.owed) >= self.limit and client_id not in self.owed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            # A bare future: wait_for makes no Task for it, just one timer.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, self.max_wait)
        self.owed.add(client_id)

    def upload_started(self, client_id: str) -> None:
        if client_id in self.owed:
            self.owed.discard(client_id)
            self._wake(1)

    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    def _wake(self, n: int) -> None:
        while n and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # timed out or cancelled (the client went away): skip it
                waiter.set_result(None)
                n -= 1
