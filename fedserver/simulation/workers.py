"""Ray side of the simulation: a pool of actors, each one `fedclient.virtual.VirtualClients`.

Imported only by `fedserver simulate` (ray costs ~1.6 s to import and is not needed anywhere
else). One actor = one task, one torch model, one data loader; it serves whichever virtual
clients it is handed, in batches, so a round costs W model replicas and about K/B Ray calls
(K selected clients, B per batch) however many virtual clients exist.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Generator, Sequence
from typing import Any

import ray
import ray.exceptions

from fedclient.virtual import Evaluated, Fitted, VirtualClients, VirtualSpec
from fedcore.tensors import FlatModel
from fedserver.coordinator.assembly import SetupError
from fedserver.simulation.settings import RaySettings, batches

log = logging.getLogger("fedserver")


def start_ray(s: RaySettings) -> None:
    """Connect to `s.address`, or start a small local Ray: no dashboard, a small object store,
    worker logs kept out of the coordinator's output."""
    common: dict[str, Any] = {
        "log_to_driver": False,
        "configure_logging": False,
        "include_dashboard": False,
    }
    if s.address:
        ray.init(address=s.address, **common)
        return
    # Local workers must import the task (and fedgrpc) as this process does. Through the
    # environment the raylet and its workers inherit, not a runtime_env: Ray prestarts one
    # worker per CPU without any runtime_env, and actors with one could not use them, so each
    # start-up paid for W extra worker processes (Python + ray imports) it then killed unused.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    num_cpus = None
    if s.workers is not None:
        num_cpus = max(1, math.ceil(s.workers * s.cpus))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # quiet a FutureWarning
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=s.object_store_mb << 20,
        _temp_dir=s.temp_dir,
        **common,
    )


def _worker_count(s: RaySettings) -> int:
    if s.workers is not None:
        return s.workers
    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 1) // s.cpus)
    if s.gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0) // s.gpus))
    if fit < 1:
        raise SetupError(
            f"the Ray cluster has {resources.get('CPU', 0)} CPU(s) and "
            f"{resources.get('GPU', 0)} GPU(s): not enough for one worker with "
            f"--client-resources cpus={s.cpus:g},gpus={s.gpus:g}"
        )
    return fit


class Batch:
    """One Ray call's results, awaited by the driver. A worker lost on it (Ray has already
    retried: max_restarts, max_task_retries) fails the batch's clients, not the whole run:
    they are dropped clients of the round, like clients whose task raised."""

    def __init__(self, ref: Any, ids: Sequence[str], failed: Callable[[str, str], Any]) -> None:
        self.ref, self.ids, self.failed = ref, ids, failed

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self._results().__await__()

    async def _results(self) -> list[Any]:
        try:
            return list(await self.ref)
        except ray.exceptions.RayError as e:
            error = f"{type(e).__name__}: {e}"
            log.warning("a Ray worker failed on %d virtual client(s): %s", len(self.ids), error)
            return [self.failed(cid, error) for cid in self.ids]


class WorkerPool:
    """W actors; `fit`/`evaluate` yield results in the order of the ids they were given."""

    def __init__(self, spec: VirtualSpec, s: RaySettings) -> None:
        count = _worker_count(s)
        threads = max(1, int(s.cpus))
        actor = ray.remote(VirtualClients).options(  # type: ignore[attr-defined]
            num_cpus=s.cpus, num_gpus=s.gpus, max_restarts=2, max_task_retries=2
        )
        spec = VirtualSpec(**{**spec.__dict__, "threads": threads})
        self.actors = [actor.remote(spec) for _ in range(count)]
        self._model_ref: tuple[str, Any] | None = None
        self._strategy_ref: tuple[str, Any] | None = None
        # Wait for every actor to have built its task and model (torch import, data): that
        # start-up must not count against round 1's --round-timeout.
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        log.info("simulation: %d Ray worker(s), %g CPU / %g GPU each", count, s.cpus, s.gpus)

    def _model(self, model: FlatModel) -> Any:
        """One copy of the round's model in the object store, shared by every worker."""
        if self._model_ref is None or self._model_ref[0] != model.version:
            self._model_ref = (model.version, ray.put(model.buffer))
        return self._model_ref[1]

    def _strategy(self, strategy: FlatModel | None) -> Any:
        """The strategy's tensors (SCAFFOLD's c), once per version, as the model."""
        if strategy is None:
            return None
        if self._strategy_ref is None or self._strategy_ref[0] != strategy.version:
            self._strategy_ref = (strategy.version, ray.put(strategy.buffer))
        return self._strategy_ref[1]

    def _submit(
        self,
        method: str,
        header: bytes,
        model: FlatModel,
        ids: Sequence[str],
        failed: Callable[[str, str], Any],
        *extra: Any,
    ) -> list[Batch]:
        ref = self._model(model)
        return [
            Batch(
                getattr(self.actors[i % len(self.actors)], method).remote(
                    header, ref, batch, *extra
                ),
                batch,
                failed,
            )
            for i, batch in enumerate(batches(ids, len(self.actors)))
        ]

    def fit_refs(
        self, header: bytes, model: FlatModel, ids: Sequence[str], strategy: FlatModel | None = None
    ) -> list[Batch]:
        failed = lambda c, e: Fitted(c, error=e)  # noqa: E731
        return self._submit("fit", header, model, ids, failed, self._strategy(strategy))

    def evaluate_refs(self, header: bytes, model: FlatModel, ids: Sequence[str]) -> list[Batch]:
        return self._submit("evaluate", header, model, ids, lambda c, e: Evaluated(c, error=e))

    async def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
