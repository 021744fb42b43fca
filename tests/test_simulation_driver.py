"""The simulation's driver loop and virtual clients without Ray: the production coordinator
(built from `fedserver simulate`'s own flags) and `fedclient.virtual.VirtualClients` in this
process, handed work the way `WorkerPool` hands it to Ray actors. Fast; the Ray runs are in
tests/test_simulation.py."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclient.virtual import VirtualClients, VirtualSpec, client_id
from fedcore.tensors import FlatModel
from fedserver.cli import build_parser
from fedserver.coordinator.assembly import build_coordinator
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.simulation.cli import sim_settings
from fedserver.simulation.driver import SimSettings, _run, _run_async, check_settings
from fedserver.simulation.embedded import EmbeddedPool
from fedserver.simulation.inprocess import InProcessTransport
from fedserver.state.history import read_status
from tests.sim_tasks import FAIL_EVALUATE, FAIL_TRAIN

# A round that waited out its deadline would take this long: far beyond every test's timeout.
NEVER = "600"


class InlinePool:
    """WorkerPool's interface (fit_refs / evaluate_refs: awaitables of per-batch results, in id
    order), its actors replaced by VirtualClients living in this process."""

    def __init__(self, spec: VirtualSpec, workers: int = 1) -> None:
        self.clients = [VirtualClients(spec) for _ in range(workers)]

    def _refs(self, method: str, header: bytes, model: FlatModel, ids: Sequence[str]) -> list[Any]:
        n = max(1, math.ceil(len(ids) / (len(self.clients) * 4)))
        refs = []
        for i, start in enumerate(range(0, len(ids), n)):
            worker = self.clients[i % len(self.clients)]
            done = asyncio.get_running_loop().create_future()
            done.set_result(getattr(worker, method)(header, model.buffer, ids[start : start + n]))
            refs.append(done)
        return refs

    def fit_refs(
        self, header: bytes, model: FlatModel, ids: Sequence[str], strategy: FlatModel | None = None
    ) -> list[Any]:
        assert strategy is None  # SCAFFOLD's c: tests/test_scaffold_e2e.py, on the real pools
        return self._refs("fit", header, model, ids)

    def evaluate_refs(self, header: bytes, model: FlatModel, ids: Sequence[str]) -> list[Any]:
        return self._refs("evaluate", header, model, ids)


def _settings(state: Path, task: str, *flags: str) -> SimSettings:
    args = build_parser().parse_args(
        ["simulate", "--task", task, "--state-dir", str(state), "--log-format", "json", *flags]
    )
    return sim_settings(args)


def _spec(s: SimSettings) -> VirtualSpec:
    return VirtualSpec(s.server.task, s.clients, s.partitioner, s.alpha, s.server.seed)


async def _simulate(s: SimSettings, workers: int | None = None) -> Coordinator:
    """The driver loop on InlinePool, or with `workers` on the embedded engine's processes."""
    check_settings(s)
    coordinator = build_coordinator(s.server)
    pool: Any = InlinePool(_spec(s))
    try:
        if workers is not None:
            pool = await EmbeddedPool.start(_spec(s), workers)
        ids = [client_id(i) for i in range(s.clients)]
        transport, wave = InProcessTransport(coordinator), s.server.mode.simulation_wave()
        if wave is None:
            await _run(transport, pool, ids, asyncio.Event())
        else:
            await _run_async(transport, pool, ids, asyncio.Event(), wave, s.server.seed)
    finally:
        if workers is not None and isinstance(pool, EmbeddedPool):
            await pool.close()
        coordinator.store.close()
    return coordinator


# ---------------------------------------------------------------- failing virtual clients
@pytest.mark.timeout(90)
def test_failed_clients_do_not_cost_the_round_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Client 1's training and client 2's evaluation raise (ValueError, a task bug) every
    round: each round closes at once on the 3 updates (quorum 2), and the evaluation counts
    the other 3 clients instead of ending the run."""
    s = _settings(
        tmp_path / "state",
        "tests.sim_tasks:failing",
        *("--clients", "4", "--clients-per-round", "4", "--min-clients", "2"),
        *("--rounds", "2", "--eval-every", "1", "--round-timeout", NEVER),
    )
    coordinator = asyncio.run(_simulate(s))
    assert not coordinator.failure
    assert coordinator.machine.rounds_completed == 2
    campaign = coordinator.evaluations.campaign
    assert campaign is not None and campaign.round == 2
    assert sorted(campaign.reports) == sorted(client_id(i) for i in range(4) if i != FAIL_EVALUATE)
    failed_train = f"virtual client {client_id(FAIL_TRAIN)} failed: ValueError"
    failed_eval = f"virtual client {client_id(FAIL_EVALUATE)} failed to evaluate round 2"
    assert failed_train in caplog.text
    assert failed_eval in caplog.text


@pytest.mark.timeout(90)
def test_failed_client_below_quorum_reopens_then_gives_up_at_once(tmp_path: Path) -> None:
    """Quorum 3 of 3 with client 1 always failing: re-opened at once, and after
    --max-attempts the run fails (as at a deadline), without waiting --round-timeout."""
    s = _settings(
        tmp_path / "state",
        "tests.sim_tasks:failing",
        *("--clients", "3", "--min-clients", "3", "--max-attempts", "2"),
        *("--rounds", "1", "--round-timeout", NEVER),
    )
    coordinator = asyncio.run(_simulate(s))
    assert "round 1 reached no quorum in 2 attempts (2 of 3 updates)" in coordinator.failure
    assert coordinator.machine.rounds_completed == 0


@pytest.mark.timeout(90)
def test_failed_clients_do_not_stall_asynchronous_rounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--mode async: client 1 fails whenever it is drawn; the buffers fill from the others
    without waiting out a lease (--round-timeout). (A worker process: in this one the
    coordinator's central evaluation would share the task object that knows it is client 2.)"""
    s = _settings(
        tmp_path / "state",
        "tests.sim_tasks:failing",
        *("--clients", "4", "--mode", "async", "--buffer-size", "2", "--max-concurrency", "3"),
        *("--rounds", "3", "--round-timeout", NEVER),
    )
    coordinator = asyncio.run(_simulate(s, workers=1))
    assert not coordinator.failure
    assert coordinator.machine.rounds_completed == 3
    assert f"virtual client {client_id(FAIL_TRAIN)} failed: ValueError" in caplog.text


@pytest.mark.timeout(120)
def test_a_lost_embedded_worker_fails_its_batch_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Client 1's training kills its worker process (os._exit) every round: that batch's
    client fails at once (no --round-timeout), a fresh worker serves the next batch, and both
    rounds close on the other 3 updates."""
    s = _settings(
        tmp_path / "state",
        "tests.sim_tasks:crashing",
        *("--clients", "4", "--clients-per-round", "4", "--min-clients", "2"),
        *("--rounds", "2", "--round-timeout", NEVER),
    )
    coordinator = asyncio.run(_simulate(s, workers=1))
    assert not coordinator.failure
    assert coordinator.machine.rounds_completed == 2
    assert "embedded worker 0 exited (code 3)" in caplog.text
    assert f"virtual client {client_id(FAIL_TRAIN)} failed: embedded worker 0" in caplog.text


@pytest.mark.timeout(90)
def test_simulated_rounds_count_the_model_bytes_handed_out(tmp_path: Path) -> None:
    """`fedserver report`'s traffic for a simulated round: the model handed to each selected
    client counts as sent, as its pull over gRPC would (it read 0 before), and each counted
    update as received."""
    s = _settings(
        tmp_path / "state",
        "tests.sim_tasks:noisy",
        *("--clients", "4", "--clients-per-round", "3", "--min-clients", "3"),
        *("--rounds", "2", "--round-timeout", NEVER),
    )
    coordinator = asyncio.run(_simulate(s))
    assert coordinator.machine.rounds_completed == 2
    model_bytes = coordinator.model.buffer.nbytes
    rounds = read_status(tmp_path / "state")["rounds"]
    assert [r["bytes_out"] for r in rounds] == [3 * model_bytes] * 2
    assert [r["bytes_in"] for r in rounds] == [3 * model_bytes] * 2  # fp32 deltas


# ---------------------------------------------------------------- determinism
def test_numpy_and_random_are_seeded_per_client_and_round(tmp_path: Path) -> None:
    """A client's update is the same whichever clients its worker ran before it: numpy's and
    random's global generators are seeded from (seed, client, round), like torch's."""

    async def work() -> tuple[bytes, FlatModel]:
        s = _settings(tmp_path / "state", "tests.sim_tasks:noisy", "--clients", "4")
        coordinator = build_coordinator(s.server)
        try:
            seam = InProcessTransport(coordinator)
            seam.touch_all([client_id(i) for i in range(4)])
            todo = seam.training_work(exclude=set())
            assert todo is not None and client_id(3) in todo.client_ids
            return todo.header, todo.model
        finally:
            coordinator.store.close()

    header, model = asyncio.run(work())
    spec = VirtualSpec("tests.sim_tasks:noisy", 4)
    after_others = VirtualClients(spec).fit(header, model.buffer, [client_id(0), client_id(3)])
    np.random.seed(12345)  # another history of the process's generators
    alone = VirtualClients(spec).fit(header, model.buffer, [client_id(3)])
    assert after_others[1].payload is not None and alone[0].payload is not None
    assert after_others[1].payload.tobytes() == alone[0].payload.tobytes()


# ---------------------------------------------------------------- refused at start-up
def test_a_lost_ray_worker_fails_its_batch_not_the_run() -> None:
    """After Ray's own retries, a worker that died on a batch makes its clients failed
    clients of the round (reported at once, as above) instead of an exception ending the run."""
    import ray.exceptions

    from fedclient.virtual import Evaluated, Fitted
    from fedserver.simulation.workers import Batch

    async def lost() -> list[Any]:
        raise ray.exceptions.RayActorError()

    async def results(failed: Any) -> list[Any]:
        return await Batch(lost(), ["client-0", "client-1"], failed)

    fitted = asyncio.run(results(lambda c, e: Fitted(c, error=e)))
    assert [(f.client_id, f.error.split(":")[0]) for f in fitted] == [
        ("client-0", "RayActorError"),
        ("client-1", "RayActorError"),
    ]
    evaluated = asyncio.run(results(lambda c, e: Evaluated(c, error=e)))
    assert all(isinstance(e, Evaluated) and e.error for e in evaluated)


def test_model_files_of_a_killed_driver_are_removed(tmp_path: Path) -> None:
    """A driver killed with -9 leaves its model file in shared memory (RAM): the next
    embedded pool removes the files of drivers that are gone, not those of live ones."""
    from fedserver.simulation import embedded

    root = tmp_path / "shm"
    gone = root / f"{embedded.PREFIX}999999999-abc"  # above any pid_max: never alive
    alive = root / f"{embedded.PREFIX}{os.getpid()}-abc"
    for path in (gone, alive):
        path.mkdir(parents=True)
        (path / "model-1.bin").write_bytes(b"x")
    embedded._remove_orphans(root)
    assert not gone.exists()
    assert (alive / "model-1.bin").exists()
