"""The simulation loop: the real coordinator, its round machine deciding; Ray workers training.

Each round: every virtual client is marked live (a dict entry each), the round machine opens
the round and selects K of them exactly as it would select processes, the K selected run on
the workers in batches, and their updates are submitted one by one in client-id order through
the in-process servicer (seam.py). Aggregation, checkpoints, DP accounting, evaluation and the
state dir are the coordinator's own, so `fedserver status` / `report` / resume work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedclient.partition import Partition
from fedclient.virtual import VirtualSpec, client_id, client_index
from fedserver.assembly import EXIT_FAILED, EXIT_OK, ServerSettings, SetupError, build_coordinator
from fedserver.progress import show_progress
from fedserver.simulation.seam import InProcessServicer
from fedserver.simulation.settings import RaySettings

if TYPE_CHECKING:
    from fedserver.simulation.workers import WorkerPool

log = logging.getLogger("fedserver")

# How long to sleep on the coordinator when no virtual client has work: only while a round
# waits for its deadline (some virtual client failed) or a re-open.
IDLE_WAIT = 1.0


@dataclass(frozen=True)
class SimSettings:
    server: ServerSettings
    clients: int
    partitioner: str = "iid"
    alpha: float = 0.5
    encoding: str = ""
    ray: RaySettings = field(default_factory=RaySettings)


async def simulate(s: SimSettings) -> int:
    """Run the simulation to the end (or a signal); the exit code `fedserver run` would give."""
    from fedserver.simulation import workers  # imports ray

    if s.clients < s.server.policy.min_clients:
        raise SetupError(
            f"--clients {s.clients} is below --min-clients {s.server.policy.min_clients}: "
            "no round could ever open"
        )
    if s.server.secure != "none":
        raise SetupError("--secure cannot be simulated: run real clients (fedserver run)")
    Partition(0, s.clients, s.partitioner, s.alpha, s.server.seed)  # ValueError: usage
    coordinator = build_coordinator(s.server)
    seam = InProcessServicer(coordinator)
    ids = [client_id(i) for i in range(s.clients)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bar = asyncio.create_task(show_progress(coordinator)) if s.server.progress else None
    try:
        workers.start_ray(s.ray)
        spec = VirtualSpec(
            s.server.task, s.clients, s.partitioner, s.alpha, s.server.seed, s.encoding
        )
        pool = workers.WorkerPool(spec, s.ray)
        alive = asyncio.create_task(seam.keep_alive(ids))  # virtual clients never go silent
        try:
            await _run(seam, pool, ids, stop)
        finally:
            alive.cancel()
            pool.close()
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
        workers.stop_ray()
        coordinator.store.close()
    log.info(
        "simulation stopped after %d completed round(s); state in %s",
        coordinator.machine.rounds_completed,
        s.server.state_dir,
    )
    return code


async def _run(
    seam: InProcessServicer, pool: WorkerPool, ids: list[str], stop: asyncio.Event
) -> None:
    coordinator = seam.coordinator
    dispatched: set[str] = set()
    attempt: tuple[int, int] = (0, 0)
    while not stop.is_set():
        await _evaluate(seam, pool)
        if coordinator.done.is_set():
            return
        seam.touch_all(ids)  # opens the round once enough clients are live (all of them are)
        m = coordinator.machine
        if (m.round, m.attempts) != attempt:
            attempt, dispatched = (m.round, m.attempts), set()
        work = seam.training_work(exclude=dispatched)
        if work is None:
            await seam.wait_change(IDLE_WAIT)
            continue
        dispatched.update(work.client_ids)
        count = len(ids)
        for cid in work.client_ids:
            seam.joined(
                cid, {"hostname": "simulation", "partition": f"{client_index(cid)}/{count}"}
            )
        for ref in pool.fit_refs(work.header, work.model, work.client_ids):
            for fitted in await ref:  # batches in id order: the fold order is fixed
                if fitted.error:
                    log.warning("virtual client %s failed: %s", fitted.client_id, fitted.error)
                    continue
                assert fitted.payload is not None
                refused = seam.submit(fitted.header, fitted.payload, fitted.digest)
                if refused:
                    log.warning("update of %s not counted: %s", fitted.client_id, refused)
            if stop.is_set():
                break
        await seam.wait_aggregated()


async def _evaluate(seam: InProcessServicer, pool: WorkerPool) -> None:
    """Federated evaluation of the last published model, when the coordinator asks for one."""
    work = seam.evaluation_work()
    if work is None:
        return
    for ref in pool.evaluate_refs(work.header, work.model, work.client_ids):
        for result in await ref:
            refused = seam.submit_evaluation(result)
            if refused:
                log.warning("evaluation not counted: %s", refused)
