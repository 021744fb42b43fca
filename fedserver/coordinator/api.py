"""The coordinator's public face for its transports: the only names they use.

Two transports drive one Coordinator (like Flower's Grid with grpc_grid.py and
inmemory_grid.py): the gRPC servicer (fedserver/transport/service.py and its helpers) and the
simulation's in-process transport (fedserver/simulation/inprocess.py). Both take a
`CoordinatorAPI`; `Coordinator` implements it (lifecycle.py, plus the queries in queries.py).
What a transport may not do: reach into the round machine, its deadline, the coordinator's
events, or anything starting with `_` (tests/test_import_graph.py checks the last one).
A new RPC or transport needs only what is listed here; a coordinator refactor keeps this
surface and the transports stay as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fedcore.tensors import FlatModel
from fedserver.coordinator.offers import Offer
from fedserver.updates.messages import PendingSubmit, SubmitHeader, SubmitResult

if TYPE_CHECKING:
    from fedserver.coordinator.liveness import LivenessWatch
    from fedserver.protocols.base import RoundProtocol
    from fedserver.rounds.population import Population
    from fedserver.rounds.synchronous import RoundPolicy
    from fedserver.state.history import RoundRecord
    from fedserver.state.metrics import Metrics


@dataclass(frozen=True)
class Due:
    """Clients that owe work now (an update, or an evaluation of `offer.model`), in client-id
    order, and the Offer a poll would answer the first of them with (the others' differ only
    in nothing a header carries)."""

    offer: Offer
    round: int
    client_ids: list[str]


@dataclass(frozen=True)
class StatusView:
    """What GetStatus reports, besides the recent rounds."""

    state: str  # as Offer.state
    round: int
    total_rounds: int
    rounds_completed: int
    live_clients: int
    updates_received: int
    updates_expected: int
    federation_id: str
    rejections: dict[str, int]
    failure: str


class CoordinatorAPI(Protocol):
    federation_id: str
    max_update_bytes: int
    model: FlatModel  # the current global model
    policy: RoundPolicy
    metrics: Metrics
    protocol: RoundProtocol  # served by the protocol-stage RPCs (secure_service.py)
    liveness: LivenessWatch  # Heartbeat, ReportFailure
    done: asyncio.Event  # set once training finished or failed

    # ---- clients: Join, liveness
    def touch(self, client_id: str, properties: dict[str, str] | None = None) -> None: ...
    def touch_all(self, client_ids: Iterable[str]) -> None: ...
    def enlist(self, population: Population) -> None: ...
    def seen_ago(self, client_id: str) -> float | None: ...
    def live_ids(self) -> Collection[str]: ...
    def task_name(self) -> str: ...
    def base_model(self) -> str: ...

    # ---- the model: what a client is offered
    def offer(self, client_id: str, known_version: str) -> Offer | None: ...
    async def poll(self, client_id: str, known_version: str, wait: float) -> Offer: ...
    def training_due(self, exclude: Collection[str]) -> Due | None: ...
    def pull_due(self, client_ids: Collection[str]) -> Due | None: ...
    def evaluation_due(self, exclude: Collection[str]) -> Due | None: ...
    def evaluation_round(self) -> int: ...
    def round_attempt(self) -> tuple[int, int]: ...

    # ---- updates and evaluations
    def max_update_tensors(self) -> int: ...
    async def settled(self) -> None: ...
    def begin_submit(self, header: SubmitHeader) -> PendingSubmit: ...
    def finish_submit(self, pending: PendingSubmit, digest: str) -> SubmitResult: ...
    def abort_submit(self, pending: PendingSubmit) -> None: ...
    def reject(self, exc: Exception) -> Exception: ...
    def submit_evaluation(
        self,
        client_id: str,
        round_number: int,
        model_version: str,
        num_examples: int,
        metrics: dict[str, float],
    ) -> tuple[bool, str]: ...

    # ---- time and state
    def decide_now(self, ran: Collection[str]) -> bool: ...
    async def wait_change(self, timeout: float) -> None: ...
    async def wait_idle(self) -> None: ...
    def status(self) -> StatusView: ...
    def recent_rounds(self, limit: int) -> tuple[list[RoundRecord], int]: ...
