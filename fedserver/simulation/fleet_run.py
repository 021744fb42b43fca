"""Rounds on a simulated device fleet (`fedserver simulate --fleet`): the coordinator runs on
the fleet's virtual clock (clock.py) and this loop moves it from event to event.

Synchronous rounds: when an attempt opens at fleet time t0 (deadline t0 + --round-timeout),
each selected client's trip is known from its device (fleet.py) and, once it has trained,
its example count and update size: a client unavailable at t0, or offline before it could
finish, or past the deadline, is not trained at all. The others train (on the engine's
workers, as without a fleet), and their measured example count and update size give their
arrival time. Updates are then delivered in arrival order, the clock advanced to each; a
client that goes offline stops heartbeating there and lapses --client-timeout later, as a
vanished process does; one that fails reports it (ReportFailure) at t0. When nothing more
can arrive in time the clock moves to the moment the coordinator decides: the deadline, or
the last dropout's lapse. Under --overselect the round closes on its first arrivals and the
later ones are not delivered (their devices are free again at once: a slight favour to
over-selection, as a real straggler would stay busy until it finished).

Asynchronous rounds: --max-concurrency (else --buffer-size) devices are at work at any
fleet time; whenever one arrives or drops out, another device online at that moment (drawn
with --seed) pulls the current version. Updates arrive in fleet-time order across versions,
so a slow device's update is stale by the versions that fast ones made meanwhile.

Aggregation, evaluation and the host's own work take no fleet time. Nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedclient.virtual import client_id, client_index
from fedcore.proto import coordinator_pb2 as pb
from fedserver.coordinator.assembly import SetupError
from fedserver.rounds.synchronous import Phase
from fedserver.simulation.clock import VirtualClock
from fedserver.simulation.fleet import Fleet, Trip, trip
from fedserver.simulation.inprocess import InProcessTransport, Work
from fedserver.simulation.steps import PerKey, Pool, evaluate, joined, never_delivered, submit


@dataclass
class FleetRun:
    transport: InProcessTransport
    pool: Pool
    fleet: Fleet
    clock: VirtualClock
    stop: asyncio.Event
    count: int  # --clients
    # Clients at work and when they stop heartbeating (arrival, going offline, deadline).
    alive: dict[str, float] = field(default_factory=dict)
    # (examples, update bytes) of each client that trained before: a client's data does not
    # change, so its next trip is known before it trains, and one that cannot make the
    # deadline is not trained again.
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    # ------------------------------------------------------------------ time and liveness
    def advance(self, t: float) -> None:
        """Move the clock to `t`; the clients still at work then heartbeat, as they would."""
        self.clock.advance_to(max(t, self.clock()))
        now = self.clock()
        liveness = self.transport.coordinator.liveness
        for cid, until in self.alive.items():
            if until >= now:
                liveness.heartbeat(cid)

    def touch_available(self) -> None:
        """The devices online now poll (are live), and the round machine reacts."""
        now = self.clock()
        self.transport.touch_all(client_id(i) for i in self.fleet.available(self.count, now))

    def idle(self) -> None:
        """Nothing due and nothing in flight: time passes to the next device coming online
        (or a deadline, a lease lapsing: at most --round-timeout on)."""
        now = self.clock()
        policy = self.transport.coordinator.policy
        nxt = min(self.fleet.next_change(self.count, now), now + policy.round_timeout)
        if not math.isfinite(nxt):
            raise SetupError("--fleet: no device ever comes online")
        self.advance(nxt)
        self.touch_available()

    # ------------------------------------------------------------------ training
    async def train(self, work: Work, ids: Sequence[str]) -> list[Any]:
        joined(self.transport, ids, self.count)
        out: list[Any] = []
        for ref in self.pool.fit_refs(work.header, work.model, ids, work.strategy):
            out.extend(await ref)
        return out

    def trip_of(self, fitted: Any, start: float, down: int) -> Trip:
        device = self.fleet.device(client_index(fitted.client_id))
        examples = pb.UpdateHeader.FromString(fitted.header).num_examples
        self.sizes[fitted.client_id] = (examples, int(fitted.payload.nbytes))
        return trip(device, start, down, examples, int(fitted.payload.nbytes))


async def run_sync(r: FleetRun) -> None:
    t = r.transport
    coordinator = t.coordinator
    ran = PerKey()
    failed_evaluations = PerKey()
    r.touch_available()  # opens the first round once enough devices are online
    while not r.stop.is_set():
        await evaluate(t, r.pool, failed_evaluations.of(t.evaluation_round()))
        if coordinator.done.is_set():
            return
        dispatched = ran.of(t.round_attempt())
        work = t.training_work(exclude=dispatched)
        if work is None:
            await t.wait_aggregated()
            if coordinator.done.is_set() or t.training_work(exclude=dispatched) is not None:
                continue
            r.idle()
            continue
        dispatched.update(work.client_ids)
        await _attempt(r, work, dispatched)
        await t.wait_aggregated()


async def _attempt(r: FleetRun, work: Work, dispatched: set[str]) -> None:
    """One attempt of a round, from its opening to the moment it closes or is decided."""
    t = r.transport
    coordinator = t.coordinator
    t0 = r.clock()
    deadline = t0 + coordinator.policy.round_timeout
    ttl = coordinator.policy.client_ttl
    down = work.download_bytes
    t.handed(work, work.client_ids)  # each selected device starts its download
    trips: dict[str, Trip] = {}
    lapses: dict[str, float] = {}  # a missing client: when the coordinator stops waiting for it
    events: list[tuple[float, int, str, str, Any]] = []  # (fleet time, order, kind, id, fitted)
    order = itertools.count()
    to_train = []
    for cid in work.client_ids:
        # Its trip as it trained last time (transfers alone the first time): a client that
        # cannot make it is not trained.
        bound = trip(r.fleet.device(client_index(cid)), t0, down, *r.sizes.get(cid, (0, 0)))
        if bound.arrives > deadline or math.isfinite(bound.gone):
            trips[cid] = bound
        else:
            to_train.append(cid)
    trained = await r.train(work, to_train)
    fitted_by_id = {f.client_id: f for f in trained}
    for fitted in trained:
        if fitted.error:  # ReportFailure at once: the round stops waiting for it
            trips[fitted.client_id] = Trip(gone=t0)
            lapses[fitted.client_id] = t0
            events.append((t0, next(order), "failed", fitted.client_id, fitted))
        else:
            trips[fitted.client_id] = r.trip_of(fitted, t0, down)
    for cid in work.client_ids:
        tr = trips[cid]
        if tr.arrives <= deadline:
            events.append((tr.arrives, next(order), "arrives", cid, None))
            r.alive[cid] = tr.arrives
        elif cid not in lapses:
            r.alive[cid] = min(tr.gone, deadline)  # heartbeats while online and at work
            lapses[cid] = tr.gone + ttl  # inf: online and late, heartbeating to the deadline
            if tr.gone <= deadline:
                events.append((tr.gone, next(order), "gone", cid, None))
    events.sort(key=lambda e: (e[0], e[1]))
    attempt = t.round_attempt()
    arrivals = sum(1 for e in events if e[2] == "arrives")
    try:
        for when, _, kind, cid, fitted in events:
            if r.stop.is_set() or t.round_attempt() != attempt or coordinator.done.is_set():
                return
            if coordinator.machine.phase is not Phase.COLLECTING:
                return  # closed on its first arrivals (--overselect): the rest come late
            r.advance(when)
            if kind == "failed":
                coordinator.liveness.failed(cid, attempt[0], fitted.error)
            elif kind == "arrives":
                arrivals -= 1
                if arrivals == 0:  # may close the round: the next one draws from who is online
                    r.touch_available()
                submit(t, fitted_by_id.pop(cid))
            else:
                r.alive.pop(cid, None)  # went offline: its heartbeats stop here
        if t.round_attempt() != attempt or coordinator.done.is_set():
            return
        # Nothing more arrives in time: the coordinator decides at the deadline, or once every
        # missing client has lapsed (--client-timeout after its last heartbeat) or failed.
        last = max(lapses.values(), default=r.clock())
        decide = deadline if last >= deadline else math.nextafter(last, math.inf)
        r.advance(decide)
        r.touch_available()  # may decide (at the deadline) among the devices online now
        if t.round_attempt() == attempt and not coordinator.done.is_set():
            t.decide_now(dispatched)
    finally:
        for cid in work.client_ids:
            r.alive.pop(cid, None)
        for fitted in fitted_by_id.values():  # trained, not delivered (SCAFFOLD: keeps c_i)
            never_delivered(fitted)


async def run_async(r: FleetRun, concurrency: int, seed: int) -> None:
    t = r.transport
    coordinator = t.coordinator
    failed_evaluations = PerKey()
    events: list[tuple[float, int, str, Any]] = []
    order = itertools.count()
    draw = random.Random(f"{seed}:fleet-async")
    r.touch_available()
    while not r.stop.is_set():
        await evaluate(t, r.pool, failed_evaluations.of(t.evaluation_round()))
        if coordinator.done.is_set():
            return
        await t.settled()
        for event in await _refill(r, concurrency, draw):
            heapq.heappush(events, (event[0], next(order), event[1], event[2]))
        if not events:
            r.idle()
            continue
        when, _, kind, fitted = heapq.heappop(events)
        r.advance(when)
        r.alive.pop(fitted.client_id, None)
        if kind == "failed":
            coordinator.liveness.failed(fitted.client_id, 0, fitted.error)
        elif kind == "arrives":
            await t.settled()
            if coordinator.done.is_set():  # the last version is out: the rest come late
                return
            submit(t, fitted)
        # "gone": offline; its lease lapses (--round-timeout) in fleet time, as a process's


async def _refill(r: FleetRun, concurrency: int, draw: random.Random) -> list[tuple[Any, ...]]:
    """Free devices online now pull the current version, up to `concurrency` at work."""
    free = concurrency - len(r.alive)
    if free <= 0:
        return []
    now = r.clock()
    chosen: list[str] = []
    # Rejection sampling: O(free / share online), not O(N) per arrival.
    for _ in range(50 * free):
        if len(chosen) >= free:
            break
        i = draw.randrange(r.count)
        cid = client_id(i)
        if cid not in r.alive and cid not in chosen and r.fleet.device(i).available(now):
            chosen.append(cid)
    if not chosen:
        return []
    r.transport.touch_all(chosen)
    work = r.transport.pull_work(chosen)
    if work is None:
        return []
    down = work.download_bytes
    r.transport.handed(work, work.client_ids)
    out: list[tuple[Any, ...]] = []
    for cid in work.client_ids:
        r.alive[cid] = math.inf  # at work; until known below
    for fitted in await r.train(work, work.client_ids):
        if fitted.error:  # ReportFailure at once
            out.append((now, "failed", fitted))
            continue
        tr = r.trip_of(fitted, now, down)
        if math.isfinite(tr.arrives):
            out.append((tr.arrives, "arrives", fitted))
            r.alive[fitted.client_id] = tr.arrives
        else:
            out.append((tr.gone, "gone", fitted))
            r.alive[fitted.client_id] = tr.gone
    return out
