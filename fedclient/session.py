"""One client's life: join, pull, train, push, repeat until the coordinator says finished.

Transient failures (coordinator restarting, network cut) are retried with jittered exponential
backoff, so a client never needs restarting by hand; permanent refusals end the client with a
clear message and a non-zero exit code.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from fedclient.connect_hints import Reachability
from fedclient.diagnose import explained, load
from fedclient.download import read_model_stream
from fedclient.liveness import Heartbeat, report_failure
from fedclient.model_memory import BoundModel, bind_model
from fedclient.protocols.handlers import handler_for
from fedclient.protocols.he import decrypt_aggregate
from fedclient.retry import (
    JOIN_TIMEOUT,
    RECONNECT_OPTIONS,
    RETRYABLE,
    UNREACHABLE_RETRY,
    Backoff,
    PermanentError,
    Stopped,
    retry_after,
)
from fedclient.scaffold import ControlVariate
from fedclient.settings import ClientSettings
from fedclient.submit import submit_evaluation, submit_update
from fedclient.task import LocalData, Task, warm_up_optimizer
from fedclient.tracking import ClientTracker
from fedclient.update import encode, round_tensors, train, train_config
from fedcore import checksums
from fedcore.codecs import ErrorFeedback
from fedcore.he import HEClient
from fedcore.logs import format_metrics
from fedcore.progress import live_progress
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.security import open_channel
from fedcore.tensors import FlatModel, ManifestError, to_state_dict
from fedcore.wire import CHANNEL_OPTIONS, ModelCalls

log = logging.getLogger("fedclient")
T = TypeVar("T")


class ClientSession:
    def __init__(
        self, settings: ClientSettings, task: Task, stop: threading.Event | None = None
    ) -> None:
        self.settings = settings
        self.task = task
        self.client_id = settings.resolved_id()
        self.stop = stop or threading.Event()
        self.backoff = Backoff(give_up_after=settings.give_up_after)
        self._open_channel()
        self.federation_id = ""
        self.fingerprint = ""  # of the model this client trains; sent at Join (run sets it)
        self.base_model = ""  # a LoRA task's frozen-base hash, also sent at Join (run sets it)
        self.joined = False
        self.heartbeat_seconds = 0.0  # JoinReply's; 0: the coordinator takes no heartbeats
        self.checksum = checksums.UNOFFERED  # of updates: the first JoinReply offers we know
        self.round = 0  # the round being worked on, for a failure report
        self.held: FlatModel | None = None
        # The buffer of the last model consumed by training (its update went out from it): the
        # next model downloads into it (see ChunkAssembler); None when there is none to reuse.
        self._spare: np.ndarray | None = None
        # The model's tensors in one buffer, which downloads fill (fedclient/model_memory.py):
        # one model in memory, not two. None for a model it cannot hold that way.
        self.bound: BoundModel | None = None
        self.rounds_trained = 0
        self._personal: dict[str, Any] = {}  # FedPer tensors as this client last trained them
        self.feedback = ErrorFeedback()  # top-k's residual, carried across rounds
        self.control = ControlVariate(settings.state_dir, self.client_id)  # SCAFFOLD's c_i
        self.strategy_tensors: tuple[int, FlatModel] | None = None  # (round, SCAFFOLD's c)
        self.he = HEClient(settings.he_key) if settings.he_key else None  # HEError: bad key
        self.reach = Reachability(settings.server, settings.tls)
        self.unreachable: str | None = None  # why the last call could not connect
        self.tracker = ClientTracker.of(settings, self.client_id)  # --track; None without

    # ------------------------------------------------------------------ plumbing
    def _open_channel(self) -> None:
        """A new channel and stubs; one given up on is left to close when unreferenced (a
        round's protocol handler may still hold a stub on it)."""
        s = self.settings
        options = (*CHANNEL_OPTIONS, *RECONNECT_OPTIONS)
        self.channel = open_channel(s.server, s.tls, s.token, options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.calls = ModelCalls(self.channel)  # model pull and upload without protobuf copies

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run an RPC, retrying transient failures until the give-up budget runs out."""
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                if not self.joined:
                    self._join()
                result = fn()
                self.backoff.reset()
                return result
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE:
                    raise
                self.joined = False
                self.unreachable = (  # Misconfigured when waiting cannot help
                    self.reach.check(e.details(), self.backoff.failing_since, self.federation_id)  # type: ignore[attr-defined]
                    if code == grpc.StatusCode.UNAVAILABLE
                    else None
                )
                try:
                    delay = self.backoff.next_delay(retry_after(e))
                except TimeoutError:
                    raise PermanentError(
                        f"coordinator at {self.settings.server} unreachable for "
                        f"{self.settings.give_up_after:.0f}s ({code.name}: {e.details()})"  # type: ignore[attr-defined]
                    ) from None
                if self.unreachable is not None:
                    delay = min(delay, UNREACHABLE_RETRY)
                else:
                    log.warning(
                        "%s failed (%s: %s); retrying in %.1fs", what, code.name, e.details(), delay
                    )  # type: ignore[attr-defined]
                if self.stop.wait(delay):
                    raise Stopped from None

    def _join_timeout(self) -> float:
        if self.backoff.failing_since is None:
            return JOIN_TIMEOUT
        spent = time.monotonic() - self.backoff.failing_since
        return max(1.0, min(JOIN_TIMEOUT, self.settings.give_up_after - spent))

    def _join(self) -> None:
        call = self.stub.Join.future(
            self.settings.join_request(self.client_id, self.fingerprint, self.base_model),
            # After a failure, wait for the channel to reconnect instead of failing fast, so the
            # client resumes as soon as the coordinator is back (within the give-up budget).
            timeout=self._join_timeout(),
            # Not while unreachable: a failing call brings the reason, to report and diagnose.
            wait_for_ready=self.backoff.failing_since is not None and self.unreachable is None,
        )
        try:
            while True:  # short waits: Ctrl-C / SIGTERM must not sit out a 30 s Join
                try:
                    reply = call.result(timeout=0.25)
                    break
                except grpc.FutureTimeoutError:
                    if self.stop.is_set():
                        raise Stopped from None
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                # The channel may be stuck connecting (one client never reached a restarted
                # coordinator in 120 s); a new one connects afresh (tests/test_reconnect.py).
                log.info("no answer to Join within its deadline; reconnecting on a new channel")
                self._open_channel()
            raise
        except BaseException:
            call.cancel()
            raise
        if self.federation_id and reply.federation_id != self.federation_id:
            log.warning("coordinator runs a different federation now; dropping cached model")
            self.held = None
        if not self.federation_id or reply.federation_id != self.federation_id:
            log.info(
                "joined federation %s at %s as %s",
                reply.federation_id[:8],
                self.settings.server,
                self.client_id,
            )
        self.federation_id = reply.federation_id
        self.heartbeat_seconds = reply.heartbeat_seconds
        self.checksum = checksums.choose(reply.checksums)
        self.joined = True

    def _busy(self, round_number: int) -> Heartbeat:
        """Heartbeats while training or evaluating (no RPC is made for as long as it takes)."""
        self.round = round_number
        beat = self.stub.Heartbeat
        return Heartbeat(beat, self.client_id, round_number, self.heartbeat_seconds)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        try:
            return self._run()
        except (Stopped, PermanentError, grpc.RpcError):
            raise
        except Exception as e:  # the user's Task raised: say so before exiting, then re-raise
            if self.joined:
                report_failure(self.stub.ReportFailure, self.client_id, self.round, e)
            raise
        finally:
            if self.bound is not None:
                self.bound.close()

    def _run(self) -> int:
        data, model, manifest = load(self.task, self.settings.partition)
        self.fingerprint = manifest.fingerprint
        base = getattr(self.task, "base_fingerprint", None)
        self.base_model = base() if callable(base) else ""
        warm_up_optimizer(self.task, model)  # before joining: not against round 1's deadline
        personal = self.settings.personal_tensors or getattr(self.task, "personal_tensors", "")
        self.bound = bind_model(self.task, model, manifest, personal, self.settings.state_dir)
        if self.bound is not None:
            self._spare = self.bound.buffer  # the first global downloads into the model
        while True:
            header = self._call("pull", self._pull)
            if header.decrypt_round and self.he is not None:
                with self._busy(header.decrypt_round):
                    decrypt_aggregate(
                        self.stub,
                        self._call,
                        self.he,
                        self.client_id,
                        header.decrypt_round,
                        self.settings.rpc_timeout,
                        self.checksum,
                    )
            if header.evaluate_round:
                with self._busy(header.evaluate_round):
                    self._evaluate_and_submit(header, model, data)
            if header.state == pb.FINISHED:
                log.info(
                    "coordinator says training is finished (%s); trained %d round(s)",
                    header.message,
                    self.rounds_trained,
                )
                return 0
            if header.state == pb.SHUTTING_DOWN:
                delay = self.backoff.rng.uniform(0.5, 2.0)
                log.info("coordinator is shutting down; checking again in %.1fs", delay)
                if self.stop.wait(delay):
                    raise Stopped
                continue
            if header.selected:
                with self._busy(header.round):
                    self._train_and_submit(header, model, data)

    def _drop_held(self, nbytes: int) -> np.ndarray | None:
        """Another version of `nbytes` is about to download: drop the one held before its
        successor's buffer is allocated (two models in memory, not three), and hand over the
        spare buffer when it fits (else drop it too)."""
        self.held = None
        spare, self._spare = self._spare, None
        return spare if spare is not None and spare.size == nbytes else None

    def _is_model(self, base: FlatModel | None) -> bool:
        """Whether the model is still one buffer (a task may move it to a GPU), and `base` is
        that buffer."""
        if self.bound is None:
            return False
        return self.bound.holds(base.buffer if base is not None else None)

    def _pull(self) -> pb.ModelHeader:
        request = pb.GetGlobalModelRequest(
            client_id=self.client_id,
            known_version=self.held.version if self.held is not None else "",
            wait_seconds=self.settings.poll_seconds,
        )
        stream = self.calls.pull(
            request, timeout=self.settings.poll_seconds + self.settings.rpc_timeout
        )
        try:
            pulled = read_model_stream(stream, self._drop_held)
        except ManifestError as e:
            log.warning("model download failed (%s); pulling again", e)
            return pb.ModelHeader(state=pb.TRAINING, selected=False)
        header = pulled.header
        if pulled.model is not None:
            self.held = pulled.model
        extra = pulled.strategy_tensors
        self.strategy_tensors = (header.round, extra) if extra is not None else None
        return header

    def _evaluate_and_submit(self, header: pb.ModelHeader, model: Any, data: LocalData) -> None:
        """Federated evaluation: score the announced model on local test data and report it."""
        base = self.held
        if base is None or base.version != header.model_version:
            return  # the coordinator will send the bytes on the next pull
        metrics: dict[str, float] = {}
        num_examples = len(data.test) if data.test is not None else 0  # type: ignore[arg-type]
        if num_examples:
            if not self._is_model(base):
                model.load_state_dict(to_state_dict(base, copy=False))  # it copies
            if self._personal:  # FedPer: what this client serves is global + its own layers
                model.load_state_dict(self._personal, strict=False)
            with explained("evaluation failed", self.task, data, model):
                metrics = {k: float(v) for k, v in self.task.evaluate(model, data.test).items()}
        result = pb.EvaluationResult(
            client_id=self.client_id,
            round=header.evaluate_round,
            model_version=base.version,
            num_examples=num_examples,
            metrics=metrics,
        )
        if not submit_evaluation(self._call, self.stub, result):
            return
        if self.tracker is not None:
            self.tracker.log(
                self.federation_id, header.evaluate_round, "eval", metrics, num_examples
            )
        shown = format_metrics(metrics, sep=" ", join=", ") or "no test data"
        log.info(
            "round %d: evaluated the global model on %d local examples (%s)",
            header.evaluate_round,
            num_examples,
            shown,
        )

    def _train_and_submit(self, header: pb.ModelHeader, model: Any, data: LocalData) -> None:
        """fedclient/update.py's pipeline, with this process's progress bar, --slowdown, stop
        checks, the upload and its retries around it."""
        base = self.held
        if base is None or base.version != header.model_version:
            return  # the coordinator will send the bytes on the next pull
        config = train_config(header, self.settings.seed, self.client_id)
        handler = handler_for(
            config.extra,
            feedback=self.feedback,
            he=self.he,
            stub=self.stub,
            call=self._call,
            client_id=self.client_id,
            federation_id=self.federation_id,
            poll_seconds=self.settings.poll_seconds,
        )
        if not handler.prepare(header):
            return
        patterns = self.settings.personal_tensors or getattr(self.task, "personal_tensors", "")
        tensors = round_tensors(base.manifest.floats(), config, patterns)
        started, cpu_started = time.monotonic(), time.process_time()
        with live_progress(self.settings.progress) as progress:
            if progress is not None:
                bar = progress.add_task(
                    f"round {header.round} local epochs", total=config.local_epochs, detail=""
                )
                config = dataclasses.replace(
                    config, on_epoch=lambda epoch, _total: progress.update(bar, completed=epoch)
                )
            control = self.control.for_round(
                config.extra, header.round, self.strategy_tensors, base, self.federation_id
            )
            floats = base.manifest.floats()
            # The held model is consumed: a float32 model's update is written over its bytes
            # (not under SCAFFOLD, which reads it after), so a client holds two models' worth
            # (its own and the pulled one), not three; one where the pulled one is the model.
            self.held = None
            in_place = None
            if self.bound is not None and self._is_model(base):
                # SCAFFOLD reads the base after training; or the disk refused it: keep it apart.
                in_place = self.bound if control is None and self.bound.save_base() else None
                if in_place is None:
                    base = base.copy()
            with explained(f"round {header.round}: training failed", self.task, data, model):
                trained = train(
                    self.task, model, data, base, config, tensors, self._personal, control,
                    consume_base=control is None, in_place=in_place,
                )  # fmt: skip
            # Free once this round's update is out: nothing keeps a view of it past this call
            # (error feedback, DP and the codecs copy what they keep).
            consumed = base.buffer if control is None else None
            del base
        # --slowdown: emulate a slow device (demos, tests, benchmarks). Scaled by the CPU time
        # trained, not the wall time: on a shared host the wall time of round 1 (10 clients
        # starting at once) was 30x that of later rounds, and a slow client multiplied it again.
        work = time.process_time() - cpu_started
        if self.settings.slowdown > 1.0 and self.stop.wait((self.settings.slowdown - 1.0) * work):
            raise Stopped
        if self.stop.is_set():
            raise Stopped
        if trained.personal is not None:
            self._personal = trained.personal
        prepared = encode(
            trained, handler, self.client_id, header, self.settings.encoding, self.checksum
        )
        result, payload = prepared.result, prepared.payload
        shown = format_metrics(result.metrics, sep=" ", join=", ")
        work = (
            "computed a gradient"
            if config.mode == "fedsgd"
            else f"trained {config.local_epochs} epoch(s) at lr {config.lr:g}"
        )
        log.info(
            "round %d: %s on %d examples in %.2fs (%s)",
            header.round,
            work,
            result.num_examples,
            time.monotonic() - started,
            shown,
        )
        # The next pull downloads into it (into the model, where that is one buffer); pulls
        # come only after this upload is done with it.
        self._spare = self.bound.buffer if self._is_model(None) else consumed
        reply = submit_update(
            self._call, self.calls, prepared.header, payload, self.settings.rpc_timeout
        )
        if reply is None:
            return
        self.rounds_trained += 1
        if trained.control is not None:  # counted (or already counted): c_i ← c_i⁺
            self.control.commit(self.federation_id, floats, trained.control)
        handler.after_submit(header.round)
        if self.tracker is not None:
            m = result.metrics
            self.tracker.log(self.federation_id, header.round, "train", m, result.num_examples)
        log.info(
            "round %d: update %s (%d bytes)",
            header.round,
            "was already counted" if reply.duplicate else "accepted",
            payload.size,
        )
