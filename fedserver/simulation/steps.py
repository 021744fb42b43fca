"""What every simulation loop does with a virtual client's work (driver.py without a fleet,
fleet_run.py on one): record its Join, submit its update or evaluation through the in-process
transport, and remember who ran in a round's attempt."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedclient.scaffold import settle
from fedclient.virtual import client_index
from fedcore.tensors import FlatModel
from fedserver.simulation.inprocess import InProcessTransport

log = logging.getLogger("fedserver")


class Pool(Protocol):
    """Where virtual clients run (embedded.py, workers.py): one awaitable per batch of the ids
    given, each yielding Fitted / Evaluated in the order of its ids."""

    def fit_refs(
        self, header: bytes, model: FlatModel, ids: Sequence[str], strategy: FlatModel | None = None
    ) -> Sequence[Awaitable[list[Any]]]: ...

    def evaluate_refs(
        self, header: bytes, model: FlatModel, ids: Sequence[str]
    ) -> Sequence[Awaitable[list[Any]]]: ...

    async def close(self) -> None: ...


def joined(transport: InProcessTransport, client_ids: Sequence[str], count: int) -> None:
    for cid in client_ids:
        partition = f"{client_index(cid)}/{count}"
        transport.joined(cid, {"hostname": "simulation", "partition": partition})


def submit(transport: InProcessTransport, fitted: Any) -> None:
    """One virtual client's result to the coordinator, as its SubmitUpdate would bring it."""
    if fitted.error:
        log.warning("virtual client %s failed: %s", fitted.client_id, fitted.error)
        return
    assert fitted.payload is not None
    refused = transport.submit(fitted.header, fitted.payload, fitted.digest)
    if fitted.pending:  # SCAFFOLD: c_i⁺ replaces c_i only if the update counted, as deployed
        settle(Path(fitted.pending), counted=not refused)
    if refused:
        log.warning("update of %s not counted: %s", fitted.client_id, refused)


def never_delivered(fitted: Any) -> None:
    """An update that never reaches the coordinator (its device went offline, or it arrives
    after the round closed): its pending c_i⁺ is dropped, as a deployed client's c_i stays when
    its update is refused."""
    if fitted.pending:
        settle(Path(fitted.pending), counted=False)


@dataclass
class PerKey:
    """A set of client ids that starts empty again whenever its key (a round's attempt, an
    evaluation campaign) changes."""

    key: object = None
    ids: set[str] = field(default_factory=set)

    def of(self, key: object) -> set[str]:
        if key != self.key:
            self.key, self.ids = key, set()
        return self.ids


async def evaluate(transport: InProcessTransport, pool: Pool, failed: set[str]) -> None:
    """Federated evaluation of the last published model, when the coordinator asks for one.
    A client that fails (or whose result is refused) is not asked again for this model."""
    work = transport.evaluation_work(exclude=failed)
    if work is None:
        return
    for ref in pool.evaluate_refs(work.header, work.model, work.client_ids):
        for evaluated in await ref:
            if evaluated.error:
                failed.add(evaluated.client_id)
                log.warning(
                    "virtual client %s failed to evaluate round %d: %s",
                    evaluated.client_id,
                    work.round,
                    evaluated.error,
                )
                continue
            refused = transport.submit_evaluation(evaluated.result)
            if refused:
                failed.add(evaluated.client_id)
                log.warning("evaluation of %s not counted: %s", evaluated.client_id, refused)
