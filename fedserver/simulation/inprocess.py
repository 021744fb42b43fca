"""The simulation's transport: the coordinator driven in-process, without a socket.

What a `fedclient` process does over the network (Join, a long-poll answered with a ModelHeader,
SubmitUpdate's header/data/trailer stream, SubmitEvaluation), the simulation does here, through
the coordinator's public face for transports (fedserver/coordinator/api.py), the one the gRPC
servicer uses too, and the same protobuf messages: headers are built and parsed by
fedserver/transport/headers.py, update bytes go through the same receiver (size, finiteness
and checksum checks, spill, fold). Only the socket is missing.

Virtual clients are live as one Population (fedserver/rounds/population.py: no entry per
client, no connection, no long-poll; a round costs O(K) whatever N is);
only the clients selected in a round run, in client-id order, so float32 folding — which sums
in arrival order — is the same on any number of workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np

from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import DEFAULT_CHUNK_SIZE, FlatModel
from fedserver.coordinator.api import CoordinatorAPI, Due
from fedserver.rounds.population import Population
from fedserver.rounds.synchronous import SubmitRefused
from fedserver.transport.headers import ModelHeaders, parse_update_header
from fedserver.updates.receiver import BadUpdate


@dataclass(frozen=True)
class Work:
    """What a set of virtual clients is asked to do: the header every one of them would receive
    (serialized), the model it refers to, and who."""

    header: bytes
    model: FlatModel
    round: int
    client_ids: list[str]
    strategy: FlatModel | None = None  # the strategy's tensors the header announces (SCAFFOLD's c)

    @property
    def download_bytes(self) -> int:
        """What a pull of this work streams: the model, then the strategy's tensors."""
        extra = self.strategy.buffer.nbytes if self.strategy is not None else 0
        return int(self.model.buffer.nbytes) + int(extra)


class InProcessTransport:
    def __init__(self, coordinator: CoordinatorAPI) -> None:
        self.coordinator = coordinator
        self.headers = ModelHeaders(coordinator.policy.total_rounds)

    # ------------------------------------------------------------------ liveness
    def enlist(self, population: Population) -> None:
        """The virtual clients: live without an entry each (touch_all(population) is O(1))."""
        self.coordinator.enlist(population)

    def touch_all(self, client_ids: Iterable[str]) -> None:
        """Mark every virtual client live (what their polls would do); the machine reacts once."""
        self.coordinator.touch_all(client_ids)

    async def keep_alive(self, client_ids: Iterable[str], every: float | None = None) -> None:
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
    def round_attempt(self) -> tuple[int, int]:
        """(round, attempt) of the round collecting now: who ran is counted per attempt."""
        return self.coordinator.round_attempt()

    def training_work(self, exclude: Collection[str]) -> Work | None:
        """The selected clients that still owe an update this round (not in `exclude`)."""
        return self._work(self.coordinator.training_due(exclude))

    def pull_work(self, client_ids: Collection[str]) -> Work | None:
        """Asynchronous rounds: these clients pull the model; those handed it (and a lease)."""
        return self._work(self.coordinator.pull_due(client_ids))

    async def settled(self) -> None:
        """Before a submit under asynchronous rounds: a buffer being applied is waited out
        (as the gRPC servicer holds a SubmitUpdate), so the update counts in the next one."""
        await self.coordinator.settled()

    def handed(self, work: Work, client_ids: Collection[str]) -> None:
        """These clients were given the work's model: what their pulls would have streamed
        counts as sent (the round's bytes_out in `fedserver report`, fedgrpc_bytes_sent)."""
        self.coordinator.metrics.sent(work.download_bytes * len(client_ids))

    def decide_now(self, ran: Collection[str]) -> bool:
        """Every selected client has run: decide the round now rather than at its deadline
        (CoordinatorAPI.decide_now)."""
        return self.coordinator.decide_now(ran)

    def submit(self, header: bytes, payload: np.ndarray, digest: str) -> str | None:
        """SubmitUpdate without the socket; None when counted, else why it was refused."""
        c = self.coordinator
        try:
            parsed = parse_update_header(pb.UpdateHeader.FromString(header), c.max_update_tensors())
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
        return self.coordinator.evaluation_round()

    def evaluation_work(self, exclude: Collection[str]) -> Work | None:
        """The clients that still owe an evaluation of the current model (not in `exclude`)."""
        return self._work(self.coordinator.evaluation_due(exclude))

    def submit_evaluation(self, result: bytes) -> str | None:
        r = pb.EvaluationResult.FromString(result)
        try:
            self.coordinator.submit_evaluation(
                r.client_id, r.round, r.model_version, r.num_examples, dict(r.metrics)
            )
        except (BadUpdate, SubmitRefused) as e:
            return str(e)
        return None

    def _work(self, due: Due | None) -> Work | None:
        if due is None:
            return None
        header = self.headers.build(due.offer).SerializeToString()
        offer = due.offer
        return Work(header, offer.model, due.round, due.client_ids, offer.strategy_tensors)

    # ------------------------------------------------------------------ waiting
    async def wait_change(self, timeout: float) -> None:
        """Until the coordinator's state changes (a round opens or closes) or `timeout`."""
        await self.coordinator.wait_change(timeout)

    async def wait_aggregated(self) -> None:
        await self.coordinator.wait_idle()
