"""The embedded engine (the default): virtual clients in W local worker processes, or in this
process with --workers 0. No Ray, nothing to start but the workers.

The same interface as the Ray pool (workers.py): `fit_refs` / `evaluate_refs` hand a round's
clients out in batches, round-robin over the workers, and return one awaitable per batch in
id order, so the driver folds updates in client-id order on any number of workers — and the
same bytes as on Ray, since each worker runs the same `fedclient.virtual.VirtualClients`.

The model crosses to the workers once per version, as a file in shared memory (/dev/shm,
else the temp dir) that each worker maps read-only (embedded_worker.py); requests and results
are bytes in frames over each worker's pipes (frames.py), never pickles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedclient.virtual import Evaluated, Fitted, VirtualClients, VirtualSpec
from fedcore.tensors import FlatModel
from fedserver.coordinator.assembly import SetupError
from fedserver.simulation import frames
from fedserver.simulation.settings import batches

log = logging.getLogger("fedserver")

SHARED_MEMORY = Path("/dev/shm")


# Up to this many usable CPUs the default is in-process (--workers 0): the driver's intake and
# fold of K updates a round already keeps one CPU busy, one training thread beside it uses the
# other, and each worker process would cost another copy of torch (~245 MB RSS). Measured on 2
# cores (bench.simulation --workers 0 1 2, docs/simulation.md): as fast or faster at N = 1,000
# and 10,000, at a third of 2 workers' memory.
IN_PROCESS_CPUS = 2


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(threads: int) -> int:
    """0 (in this process) on up to IN_PROCESS_CPUS CPUs; else a worker process per
    `threads` CPUs."""
    cpus = usable_cpus()
    if cpus <= IN_PROCESS_CPUS:
        return 0
    return max(1, cpus // max(1, threads))


PREFIX = "fedgrpc-sim-"  # + the driver's pid: its model files in shared memory
EXIT_GRACE = 5.0  # seconds a worker whose output ended has to exit before it is killed


def _remove_orphans(root: Path) -> None:
    """The model files of drivers killed before they could remove them (kill -9): shared
    memory is RAM, and nothing else would ever free it."""
    for path in root.glob(f"{PREFIX}*-*"):
        pid = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


class InProcessPool:
    """--workers 0: one VirtualClients in this process, run on one thread beside the event loop
    (the coordinator keeps serving its timers while a batch trains)."""

    def __init__(self, spec: VirtualSpec) -> None:
        self.clients = VirtualClients(spec)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="virtual-clients")
        log.info("simulation: embedded engine, virtual clients in this process")

    def _refs(
        self, method: str, header: bytes, model: FlatModel, ids: Sequence[str], *extra: Any
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        run = getattr(self.clients, method)
        # Batches as for one worker process: the driver checks for a stop between batches.
        return [
            loop.run_in_executor(self.thread, run, header, model.buffer, batch, *extra)
            for batch in batches(ids, 1)
        ]

    def fit_refs(
        self, header: bytes, model: FlatModel, ids: Sequence[str], strategy: FlatModel | None = None
    ) -> list[Any]:
        return self._refs("fit", header, model, ids, None if strategy is None else strategy.buffer)

    def evaluate_refs(self, header: bytes, model: FlatModel, ids: Sequence[str]) -> list[Any]:
        return self._refs("evaluate", header, model, ids)

    async def close(self) -> None:
        self.thread.shutdown(wait=True)


@dataclass
class _Request:
    message: bytes
    op: str
    ids: Sequence[str]
    failed: Callable[[str, str], Any]
    done: asyncio.Future[list[Any]]

    def fail(self, error: str) -> None:
        if not self.done.done():
            self.done.set_result([self.failed(cid, error) for cid in self.ids])


class _Worker:
    """One worker process. Requests are written as soon as they are made (a queue in the
    worker's stdin, as in a Ray actor's mailbox: it goes from one batch to the next while the
    driver folds the last one) and answered in order, by a reader task."""

    def __init__(self, spec: VirtualSpec, index: int) -> None:
        self.spec, self.index = spec, index
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: deque[_Request] = deque()  # written, not answered yet; oldest first
        self.reader: asyncio.Task[None] | None = None
        self.starting: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self) -> None:
        env = dict(os.environ)
        # The worker imports the task (and fedgrpc) as this process does.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # Native thread pools (OpenMP, BLAS) sized to the worker's share, as Ray sizes its
        # workers': W workers each spinning up a thread per core oversubscribe the CPUs.
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, str(self.spec.threads))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fedserver.simulation.embedded_worker",
            json.dumps(asdict(self.spec)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=1 << 20,
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:  # as long as the task takes to import and build its model (as Ray waits)
            ready = await frames.read_async(proc.stdout)
        except asyncio.IncompleteReadError:
            code = await _reap(proc)
            raise SetupError(
                f"embedded worker {self.index} did not start (exit code {code}): "
                "see its error above"
            ) from None
        assert ready == [b"ready"]
        self.proc = proc
        for request in self.pending:  # a fresh worker takes over the queue of a lost one
            proc.stdin.write(request.message)
        self.reader = asyncio.create_task(self._read(proc))

    async def call(
        self, message: bytes, op: str, ids: Sequence[str], failed: Callable[[str, str], Any]
    ) -> list[Any]:
        request = _Request(message, op, ids, failed, asyncio.get_running_loop().create_future())
        if self.closed:  # stopping: batches not started yet are not run
            request.fail("the simulation is stopping")
            return await request.done
        self.pending.append(request)
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(message)
        elif self.starting is None:  # lost on an earlier batch: a fresh one takes the queue
            self.starting = asyncio.create_task(self._restart())
        return await request.done

    async def _restart(self) -> None:
        try:
            await self.start()
        except SetupError as e:
            while self.pending:
                self.pending.popleft().fail(str(e))
        finally:
            self.starting = None

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                answer = await frames.read_async(proc.stdout)
                request = self.pending.popleft()
                request.done.set_result(frames.parse_results(request.op, answer))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            code = await _reap(proc)
            self.proc = None
            if not self.pending:
                return
            # The batch it was on fails (its clients are dropped clients of the round); the
            # batches queued behind it go to a fresh worker.
            request = self.pending.popleft()
            error = f"embedded worker {self.index} exited (code {code}): {type(e).__name__}"
            log.warning("%s, failing %d virtual client(s)", error, len(request.ids))
            request.fail(error)
            if self.closed:
                while self.pending:
                    self.pending.popleft().fail("the simulation is stopping")
            elif self.pending and self.starting is None:
                self.starting = asyncio.create_task(self._restart())

    async def close(self) -> None:
        self.closed = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if self.pending:  # in the middle of batches nobody will read: no need to wait
            await _stop(proc)
        else:
            assert proc.stdin is not None
            proc.stdin.close()  # end of file: the worker's loop returns
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                await _stop(proc)
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    return await proc.wait()


async def _reap(proc: asyncio.subprocess.Process) -> int:
    """The exit code of a worker whose output ended: it is exiting, so it is waited for before
    it is killed. Killing at once raced asyncio's child watcher: Popen.kill() polls first, and
    that poll could reap the exited worker before the watcher's thread did, which then
    reported exit code 255 instead of the worker's own (CPython gh-86276)."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(proc.wait(), EXIT_GRACE)
    return await _stop(proc)  # a worker that closed its output but hangs


class EmbeddedPool:
    """W worker processes, each one VirtualClients (one task, one torch model)."""

    def __init__(self, spec: VirtualSpec, workers: int) -> None:
        self.workers = [_Worker(spec, i) for i in range(workers)]
        root = SHARED_MEMORY if SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())
        _remove_orphans(root)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self._model_ref: tuple[tuple[str, str], dict[str, Any]] | None = None
        self._versions = 0

    @classmethod
    async def start(cls, spec: VirtualSpec, workers: int) -> EmbeddedPool:
        pool = cls(spec, workers)
        try:
            # Every worker builds its task and model before round 1's deadline starts to count.
            await asyncio.gather(*(w.start() for w in pool.workers))
        except BaseException:
            await pool.close()
            raise
        log.info("simulation: embedded engine, %d worker process(es)", workers)
        return pool

    def _model(self, model: FlatModel, strategy: FlatModel | None) -> dict[str, Any]:
        """The round's model written once into shared memory, the strategy's tensors (SCAFFOLD's
        c) after it as in a GetGlobalModel stream; the previous version unlinked (workers that
        still map it keep their pages until they move on). An evaluation (no strategy's tensors)
        reuses the file of its model's fit: a worker reads the model before the tensors."""
        version = (model.version, strategy.version if strategy is not None else "")
        held = self._model_ref[0] if self._model_ref is not None else None
        if held is None or held[0] != version[0] or (strategy is not None and held != version):
            self._versions += 1
            path = self.dir / f"model-{self._versions}.bin"
            with path.open("wb") as f:
                model.buffer.tofile(f)
                if strategy is not None:
                    strategy.buffer.tofile(f)
            if self._model_ref is not None:
                Path(self._model_ref[1]["path"]).unlink(missing_ok=True)
            extra = int(strategy.buffer.size) if strategy is not None else 0
            ref = {"path": str(path), "size": int(model.buffer.size) + extra, "strategy": extra}
            self._model_ref = (version, ref)
        return self._model_ref[1]

    def _submit(
        self,
        op: str,
        header: bytes,
        model: FlatModel,
        ids: Sequence[str],
        failed: Callable[[str, str], Any],
        strategy: FlatModel | None = None,
    ) -> list[Awaitable[list[Any]]]:
        ref = self._model(model, strategy)
        return [
            asyncio.ensure_future(
                self.workers[i % len(self.workers)].call(
                    frames.request(op, ref, header, batch), op, batch, failed
                )
            )
            for i, batch in enumerate(batches(ids, len(self.workers)))
        ]

    def fit_refs(
        self, header: bytes, model: FlatModel, ids: Sequence[str], strategy: FlatModel | None = None
    ) -> list[Awaitable[list[Any]]]:
        failed = lambda c, e: Fitted(c, error=e)  # noqa: E731
        return self._submit("fit", header, model, ids, failed, strategy)

    def evaluate_refs(
        self, header: bytes, model: FlatModel, ids: Sequence[str]
    ) -> list[Awaitable[list[Any]]]:
        return self._submit("evaluate", header, model, ids, lambda c, e: Evaluated(c, error=e))

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)
