"""The one place the simulation touches the coordinator: an in-process stand-in for the gRPC
servicer. Everything else in fedserver/simulation/ goes through this class.

What a `fedclient` process does over the network (Join, a long-poll answered with a ModelHeader,
SubmitUpdate's header/data/trailer stream, SubmitEvaluation), the simulation does here, through
the same coordinator calls the servicer makes and the same protobuf messages: headers are built
by the servicer's own code and parsed back by it, update bytes go through the same receiver
(size, finiteness and checksum checks, spill, fold). Only the socket is missing.

Virtual clients are "live" by being touched, a dict entry each (no connection, no long-poll);
only the clients selected in a round run, in client-id order, so float32 folding — which sums
in arrival order — is the same on any number of workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import DEFAULT_CHUNK_SIZE, FlatModel
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.rounds.synchronous import Phase, SubmitRefused
from fedserver.transport.service import CoordinatorService, _parse_header
from fedserver.updates.receiver import BadUpdate


@dataclass(frozen=True)
class Work:
    """What a set of virtual clients is asked to do: the header every one of them would receive
    (serialized), the model it refers to, and who."""

    header: bytes
    model: FlatModel
    round: int
    client_ids: list[str]


class InProcessServicer:
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._servicer = CoordinatorService(coordinator)

    # ------------------------------------------------------------------ liveness
    def touch_all(self, client_ids: Iterable[str]) -> None:
        """Mark every virtual client live (what their polls would do), then let the round
        machine react once: per-client `Coordinator.touch` would step the machine N times."""
        machine = self.coordinator.machine
        last = None
        for cid in client_ids:
            machine.touch(cid)
            last = cid
        if last is not None:
            self.coordinator.touch(last)

    async def keep_alive(self, client_ids: list[str], every: float | None = None) -> None:
        """Every virtual client's heartbeat: touch them all every third of --client-timeout,
        for as long as the simulation runs. A round (training, aggregation, evaluation) longer
        than the timeout would otherwise expire the N - K clients that did not train, and the
        next round, opened as the last one commits, would select among the last K only."""
        while True:
            self.touch_all(client_ids)
            await asyncio.sleep(every or self.coordinator.liveness.heartbeat_interval())

    def joined(self, client_id: str, properties: dict[str, str]) -> None:
        """A Join: recorded in the state dir's clients table (only for clients that ran)."""
        self.coordinator.touch(client_id, properties)

    # ------------------------------------------------------------------ training
    def training_work(self, exclude: set[str]) -> Work | None:
        """The selected clients that still owe an update this round (not in `exclude`)."""
        c = self.coordinator
        m = c.machine
        if m.phase is not Phase.COLLECTING or c.shutting_down:
            return None
        todo = sorted(
            cid for cid in m.selected if m.expects_update_from(cid) and cid not in exclude
        )
        if not todo:
            return None
        offer = c.offer(todo[0], "")
        if offer is None or not offer.selected:
            return None
        return Work(self._servicer._header(offer).SerializeToString(), offer.model, m.round, todo)

    def decide_now(self, ran: set[str]) -> bool:
        """Every client selected in this attempt has reported or ran without reporting (it
        failed, or its update was refused): nothing more can arrive. Whatever the round's
        deadline would decide (close on a quorum, re-open for others, give up after
        --max-attempts), decide it now instead of idling out --round-timeout. True when that
        changed something; False, doing nothing, when no round is collecting or some selected
        client has not run yet."""
        c = self.coordinator
        m = c.machine
        if m.phase is not Phase.COLLECTING or c.shutting_down or c.failure:
            return False
        if any(m.expects_update_from(cid) and cid not in ran for cid in m.selected):
            return False
        before = (m.round, m.attempts, m.phase, c.failure)
        m.deadline = min(m.deadline, m.clock())
        c._advance()
        return (m.round, m.attempts, m.phase, c.failure) != before

    def submit(self, header: bytes, payload: np.ndarray, digest: str) -> str | None:
        """SubmitUpdate without the socket; None when counted, else why it was refused."""
        c = self.coordinator
        try:
            parsed = _parse_header(
                pb.UpdateHeader.FromString(header), self._servicer._max_update_tensors()
            )
        except BadUpdate as e:
            c.reject(e)
            return str(e)
        try:
            pending = c.begin_submit(parsed)
        except (BadUpdate, SubmitRefused) as e:
            return str(e)
        data = memoryview(np.ascontiguousarray(payload).view(np.uint8))
        try:
            try:
                for start in range(0, len(data), DEFAULT_CHUNK_SIZE):
                    pending.receiver.add(data[start : start + DEFAULT_CHUNK_SIZE])
            except BadUpdate as e:
                c.reject(e)
                return str(e)
            try:
                c.finish_submit(pending, digest)  # counts its own refusals
            except (BadUpdate, SubmitRefused) as e:
                return str(e)
        finally:
            c.abort_submit(pending)  # idempotent: a no-op after a finish; frees slots otherwise
        return None

    # ------------------------------------------------------------------ federated evaluation
    def evaluation_round(self) -> int:
        """The round whose model is being evaluated by clients now, or 0."""
        campaign = self.coordinator.evaluations.campaign
        return campaign.round if campaign is not None else 0

    def evaluation_work(self, exclude: set[str]) -> Work | None:
        """The clients that still owe an evaluation of the current model (not in `exclude`)."""
        c = self.coordinator
        campaign = c.evaluations.campaign
        if campaign is None or campaign.version != c.model.version:
            return None
        todo = sorted(
            cid for cid in campaign.selected if campaign.pending(cid) and cid not in exclude
        )
        if not todo:
            return None
        offer = c.offer(todo[0], "")
        if offer is None or not offer.evaluate_round:
            return None
        return Work(
            self._servicer._header(offer).SerializeToString(), offer.model, campaign.round, todo
        )

    def submit_evaluation(self, result: bytes) -> str | None:
        r = pb.EvaluationResult.FromString(result)
        try:
            self.coordinator.evaluations.submit_evaluation(
                r.client_id, r.round, r.model_version, r.num_examples, dict(r.metrics)
            )
        except (BadUpdate, SubmitRefused) as e:
            return str(e)
        return None

    # ------------------------------------------------------------------ waiting
    async def wait_change(self, timeout: float) -> None:
        """Until the coordinator's state changes (a round opens or closes) or `timeout`."""
        changed = self.coordinator._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    async def wait_aggregated(self) -> None:
        await self.coordinator.wait_idle()
