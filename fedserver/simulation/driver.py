"""The simulation loop: the real coordinator, its round machine deciding; an engine's workers
(embedded.py: local processes or this one; workers.py: Ray) training.

Each round: every virtual client is marked live (one Population, O(1)), the round machine opens
the round and selects K of them exactly as it would select processes, the K selected run on
the workers in batches, and their updates are submitted one by one in client-id order through
the in-process transport (inprocess.py). Aggregation, checkpoints, DP accounting, evaluation and the
state dir are the coordinator's own, so `fedserver status` / `report` / resume work unchanged.

A virtual client whose task raises is a dropped client of that round: once every selected
client has run, the round is decided at once (quorum rules as at its deadline), not after
--round-timeout. A failed federated evaluation is counted as failed and not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import random
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedclient.partition import Partition
from fedclient.virtual import ID_PREFIX, VirtualSpec
from fedcore.plugins import load_object
from fedserver.coordinator.assembly import (
    EXIT_FAILED,
    EXIT_OK,
    CoordinatorSettings,
    SetupError,
    build_coordinator,
)
from fedserver.coordinator.progress import show_progress
from fedserver.rounds.population import Population
from fedserver.simulation.clock import VirtualClock
from fedserver.simulation.fleet import Fleet
from fedserver.simulation.inprocess import InProcessTransport
from fedserver.simulation.settings import RaySettings
from fedserver.simulation.steps import PerKey, Pool, evaluate, joined, submit
from fedserver.state.history import RoundRecord

log = logging.getLogger("fedserver")

CLIENT_STATE = "virtual-clients"  # the StateStore (fedclient/state.py) in the state dir

# How long to sleep on the coordinator when no virtual client has work and no round can be
# decided: only while no round is collecting (aggregating, stopping).
IDLE_WAIT = 1.0


@dataclass(frozen=True)
class SimSettings:
    server: CoordinatorSettings
    clients: int
    partitioner: str = "iid"
    alpha: float = 0.5
    encoding: str = ""
    device: str = "cpu"  # of the virtual clients (fedclient --device); cpu unless gpus > 0
    precision: str = "fp32"
    ray: RaySettings = field(default_factory=RaySettings)
    progress: bool = False  # rich progress bar on stderr (only when it is a terminal)
    engine: str = "embedded"  # or "ray" (settings.ENGINES)
    fleet: Fleet | None = None  # --fleet: devices' speeds, links, availability; fleet time


@dataclass(frozen=True)
class Outcome:
    """How a simulation ended: the exit code `fedserver run` would give, why it failed (""),
    and every round the state dir records."""

    code: int
    failure: str
    rounds: list[RoundRecord]


async def simulate(s: SimSettings) -> Outcome:
    """Run the simulation to the end (or a signal)."""
    check_settings(s)
    clock = VirtualClock() if s.fleet is not None else None
    try:
        coordinator = build_coordinator(s.server, clock)
    except ValueError as e:  # a flag's value (strategy parameters...), as for `fedserver run`
        raise SetupError(str(e)) from None
    if clock is not None:  # a resumed fleet goes on from where its last round closed
        last = coordinator.store.recent_rounds(1)[0]
        clock.advance_to(last[0].closed_at if last and last[0].fleet_seconds is not None else 0.0)
    transport = InProcessTransport(coordinator)
    ids = Population(s.clients, ID_PREFIX)  # client-0 ... as a list, in O(1) memory
    if clock is None:  # on a fleet, who is live is the fleet's (fleet_run.py touches them)
        transport.enlist(ids)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Only the main thread can take signals: the Python API may run the driver in another.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    bar = asyncio.create_task(show_progress(coordinator)) if s.progress else None
    ray_started = False
    try:
        spec = VirtualSpec(
            s.server.task,
            s.clients,
            s.partitioner,
            s.alpha,
            s.server.seed,
            s.encoding,
            device=s.device,
            precision=s.precision,
            threads=max(1, int(s.ray.cpus)),
            # What a fedclient process keeps in memory between rounds, on disk: beside the
            # coordinator's state, so a resumed simulation resumes its clients too.
            state_dir=str((s.server.state_dir / CLIENT_STATE).resolve()),
            federation_id=coordinator.federation_id,
        )
        ray_started = s.engine == "ray"
        pool = await start_pool(s, spec)
        wave = s.server.mode.simulation_wave()
        # Without a fleet virtual clients never go silent; on a fleet, who is online is the
        # fleet's (fleet_run.py), in fleet time.
        alive = None if clock else asyncio.create_task(transport.keep_alive(ids))
        try:
            if s.fleet is not None and clock is not None:
                await _run_fleet(transport, pool, s, clock, stop, wave)
            elif wave is None:
                await _run(transport, pool, ids, stop)
            else:
                await _run_async(transport, pool, ids, stop, wave, s.server.seed)
        finally:
            if alive is not None:
                alive.cancel()
            await pool.close()
        if stop.is_set():
            await coordinator.shut_down()
            code = EXIT_OK
        else:
            code = EXIT_FAILED if coordinator.failure else EXIT_OK
    finally:
        if bar is not None:
            bar.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bar
        if ray_started:
            from fedserver.simulation import workers

            workers.stop_ray()
        if coordinator.publisher.tracker is not None:  # flushed within --track-timeout
            await asyncio.to_thread(coordinator.publisher.tracker.close, coordinator.failure)
        rounds = coordinator.store.recent_rounds(coordinator.policy.total_rounds + 1)[0]
        coordinator.store.close()
    log.info(
        "simulation stopped after %d completed round(s); state in %s",
        coordinator.machine.rounds_completed,
        s.server.state_dir,
    )
    return Outcome(code, coordinator.failure or "", rounds)


async def _run_fleet(
    transport: InProcessTransport,
    pool: Pool,
    s: SimSettings,
    clock: VirtualClock,
    stop: asyncio.Event,
    wave: int | None,
) -> None:
    from fedserver.simulation.fleet_run import FleetRun, run_async, run_sync

    assert s.fleet is not None
    log.info("fleet %s: %d devices, fleet time starts at %.0fs", s.fleet.source, s.clients, clock())
    run = FleetRun(transport, pool, s.fleet, clock, stop, s.clients)
    if wave is None:
        await run_sync(run)
    else:
        await run_async(run, wave, s.server.seed)


async def start_pool(s: SimSettings, spec: VirtualSpec) -> Pool:
    """The engine's workers, each with its task and model built (SetupError: they cannot)."""
    if s.engine == "ray":
        from fedserver.simulation import workers  # imports ray: only for this engine

        try:
            workers.start_ray(s.ray)
        except (ValueError, ConnectionError) as e:  # --ray-address, --object-store-mb...
            raise SetupError(f"cannot start or reach Ray: {e}") from None
        return workers.WorkerPool(spec, s.ray)
    from fedserver.simulation.embedded import (
        EmbeddedPool,
        InProcessPool,
        default_workers,
        usable_cpus,
    )

    count = default_workers(spec.threads) if s.ray.workers is None else s.ray.workers
    if count == 0:
        return InProcessPool(spec)
    torch = sys.modules.get("torch")  # imported by a torch task's central evaluation
    if torch is not None:
        # The workers train on the CPUs; the coordinator's torch work (central evaluation)
        # runs between their batches. With a thread per core it spun against the workers:
        # rounds took 2x as long (bench.simulation, 2 cores, 2 workers).
        torch.set_num_threads(max(1, usable_cpus() - count * spec.threads))
    return await EmbeddedPool.start(spec, count)


def check_settings(s: SimSettings) -> None:
    """What cannot be simulated, refused before Ray starts or the state dir is touched."""
    if s.engine == "ray" and s.ray.workers == 0:
        raise SetupError("--workers 0 (in-process) is the embedded engine's: drop --engine ray")
    if s.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise SetupError(
            "--engine ray needs Ray, an optional extra: pip install 'fedgrpc[ray]' "
            "(or leave --engine at embedded)"
        )
    if s.clients < s.server.policy.min_clients:
        raise SetupError(
            f"--clients {s.clients} is below --min-clients {s.server.policy.min_clients}: "
            "no round could ever open"
        )
    if s.server.secure != "none":
        raise SetupError("--secure cannot be simulated: run real clients (fedserver run)")
    if s.server.mode.not_simulated:
        raise SetupError(s.server.mode.not_simulated)
    try:
        Partition(0, s.clients, s.partitioner, s.alpha, s.server.seed)
        load_object(s.server.task)
    except ValueError as e:
        raise SetupError(str(e)) from None


async def _run(
    transport: InProcessTransport, pool: Pool, ids: Sequence[str], stop: asyncio.Event
) -> None:
    coordinator = transport.coordinator
    ran = PerKey()  # clients that ran in this attempt of this round, counted or not
    failed_evaluations = PerKey()
    while not stop.is_set():
        await evaluate(transport, pool, failed_evaluations.of(transport.evaluation_round()))
        if coordinator.done.is_set():
            return
        transport.touch_all(ids)  # opens the round once enough clients are live (all of them are)
        dispatched = ran.of(transport.round_attempt())
        work = transport.training_work(exclude=dispatched)
        if work is None:
            # Every selected client has run: with some failed or refused, the round would
            # otherwise wait out --round-timeout for updates that cannot come.
            if not transport.decide_now(dispatched):
                await transport.wait_change(IDLE_WAIT)
            continue
        dispatched.update(work.client_ids)
        joined(transport, work.client_ids, len(ids))
        transport.handed(work, work.client_ids)
        for ref in pool.fit_refs(work.header, work.model, work.client_ids, work.strategy):
            for fitted in await ref:  # batches in id order: the fold order is fixed
                submit(transport, fitted)
                await asyncio.sleep(0)  # let the engine take in the next results meanwhile
            if stop.is_set():
                break
        await transport.wait_aggregated()


async def _run_async(
    transport: InProcessTransport,
    pool: Pool,
    ids: Sequence[str],
    stop: asyncio.Event,
    wave: int,
    seed: int,
) -> None:
    """Asynchronous rounds (--mode async): nobody is selected, clients pull when free. Without
    a clock of its own the simulation plays it in waves: `wave` clients drawn at random (seeded
    by --seed and the version) pull the current model at once, train, and arrive in client-id
    order. The first to arrive fill the open buffer; once it is applied, the rest count in the
    next version's, with staleness 1 or more (when `wave` exceeds --buffer-size)."""
    coordinator = transport.coordinator
    failed_evaluations = PerKey()
    waves = PerKey()  # the waves drawn for this version so far: each draw differs
    while not stop.is_set():
        await evaluate(transport, pool, failed_evaluations.of(transport.evaluation_round()))
        if coordinator.done.is_set():
            return
        await transport.settled()
        transport.touch_all(ids)
        version = transport.round_attempt()[0]
        drawn = waves.of(version)
        draw = random.Random(f"{seed}:{version}:{len(drawn)}")
        drawn.add(str(len(drawn)))
        work = transport.pull_work(draw.sample(ids, min(wave, len(ids))))
        if work is None:  # no buffer open, or no slot free (--max-concurrency)
            await transport.wait_change(IDLE_WAIT)
            continue
        joined(transport, work.client_ids, len(ids))
        transport.handed(work, work.client_ids)
        for ref in pool.fit_refs(work.header, work.model, work.client_ids, work.strategy):
            for fitted in await ref:
                if coordinator.done.is_set():  # the last version is out: the rest come late
                    return
                await transport.settled()
                submit(transport, fitted)
                await asyncio.sleep(0)  # let the engine take in the next results meanwhile
            if stop.is_set():
                break
