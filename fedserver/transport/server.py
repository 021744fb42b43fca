"""Assemble and run the coordinator daemon: state, strategy, gRPC server, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedcore.limits import excerpts
from fedcore.malloc import limit_malloc_arenas
from fedcore.proto import coordinator_pb2 as pb
from fedcore.security import SecurityError, TlsFiles, is_loopback
from fedcore.tensors import DEFAULT_CHUNK_SIZE
from fedcore.wire import CHANNEL_OPTIONS
from fedserver.coordinator.assembly import (
    EXIT_FAILED,
    EXIT_OK,
    CoordinatorSettings,
    SetupError,
    build_coordinator,
)
from fedserver.coordinator.lifecycle import Coordinator
from fedserver.coordinator.progress import log_waiting, show_progress
from fedserver.security.tokens import TokenFileError
from fedserver.transport.auth import AuthInterceptor, build_authenticator
from fedserver.transport.downloads import DownloadLimits
from fedserver.transport.joinlog import JoinLog
from fedserver.transport.limits import (
    CallQueue,
    OpenFilesWatch,
    raise_open_files_limit,
    tune_garbage_collector,
)
from fedserver.transport.registration import add_to_server
from fedserver.transport.rpc import BoundedReplies, LenientDecoding
from fedserver.transport.service import CoordinatorService

log = logging.getLogger("fedserver")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name

# No BDP probing on the coordinator's side of the connections: with it, gRPC grows each upload
# stream's receive window towards the bandwidth-delay product and buffers that much per client
# whenever the event loop falls behind — measured at 8 clients x 10M parameters: peak RSS
# 290-400 MB with it, a steady 238 MB without. Instead a fixed 256 KiB window per stream: the
# default 64 KiB made the event loop send a WINDOW_UPDATE (one sendmsg) every ~32 KiB received,
# 14% of its busy time; 1 MiB saved no more and held 12 MB more (docs/performance.md).
# Clients keep BDP probing (CHANNEL_OPTIONS): their receive windows make downloads fast.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *CHANNEL_OPTIONS,
    # gRPC sets SO_REUSEPORT by default: a second coordinator on a busy port would then start
    # and the kernel would split the clients between the two federations, neither reaching its
    # quorum (seen when two test coordinators drew the same free port). Refuse to start instead.
    ("grpc.so_reuseport", 0),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 256 << 10),
    # The queue of calls not picked up yet comes from ServeSettings.call_queue (limits.py).
)


@dataclass(frozen=True)
class ServeSettings:
    """`fedserver run`: the coordinator's settings and what only the daemon reads."""

    coordinator: CoordinatorSettings
    host: str = "127.0.0.1"
    port: int = 50051
    linger: float = 15.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    tls: TlsFiles | None = None  # None: plaintext (local debugging only)
    tokens_file: Path | None = None  # bearer tokens required when set
    metrics_port: int | None = None  # Prometheus /metrics when set (0: any free port)
    metrics_host: str = "127.0.0.1"
    progress: bool = False  # rich progress bar on stderr (only when it is a terminal)
    call_queue: CallQueue = field(default_factory=CallQueue)  # gRPC's, before authentication
    downloads: DownloadLimits = field(default_factory=DownloadLimits)


async def serve(s: ServeSettings) -> int:
    limit_malloc_arenas()
    files = OpenFilesWatch(raise_open_files_limit())  # one descriptor per connected client
    coordinator = build_coordinator(s.coordinator)
    tune_garbage_collector()
    try:
        credentials = s.tls.server_credentials() if s.tls else None
        auth = build_authenticator(s.tls is not None and s.tls.ca is not None, s.tokens_file)
    except (SecurityError, TokenFileError) as e:
        raise SetupError(str(e)) from None
    auth.on_denied = coordinator.metrics.refused_call
    # Bounded replies outermost: every handler (the authenticator's refusals too) gets a context
    # whose status messages are capped. Lenient decoding next: corrupt messages reach the
    # servicer as None and are refused there. The auth interceptor always runs: even without
    # authentication, a Coordinator RPC with no entry in its authorization table is refused.
    interceptors = [BoundedReplies(), LenientDecoding(), AuthInterceptor(auth)]
    options = [*SERVER_OPTIONS, *s.call_queue.server_options()]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    service = CoordinatorService(coordinator, s.chunk_size, s.downloads)
    add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{s.host}:{s.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise SetupError(f"cannot listen on {address}: is the port in use?")
    await server.start()
    # Whatever ends this block (a finished run, a signal, a setup error such as a busy metrics
    # port), the server is stopped before the event loop closes; otherwise grpc's finalizer
    # runs after the loop is gone and the process can hang at exit.
    try:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "coordinator listening on %s:%d (task %s, %d rounds, min %d clients)",
            s.host,
            port,
            s.coordinator.task,
            s.coordinator.policy.total_rounds,
            s.coordinator.policy.min_clients,
        )
        log.info("security: %s", _describe_security(s))
        if s.metrics_port is not None:
            coordinator.metrics.watch(lambda: _live_state(coordinator, files))
            try:
                bound = coordinator.metrics.serve(s.metrics_host, s.metrics_port)
            except OSError as e:
                raise SetupError(
                    f"cannot serve metrics on {s.metrics_host}:{s.metrics_port}: {e.strerror}"
                ) from None
            log.info("metrics on http://%s:%d/metrics", s.metrics_host, bound)
        if credentials is None and not is_loopback(address):
            log.warning(
                "serving PLAINTEXT on %s: model and updates travel unencrypted and "
                "unauthenticated; use --tls-cert/--tls-key/--tls-ca (fedserver certs) "
                "outside a lab",
                address,
            )
        elif credentials is not None and not auth.enabled:
            # Encrypted but open to anyone who reaches the port, on any address: TLS flags mean
            # the operator expects a protected deployment, so this must not pass unnoticed.
            log.warning(
                "serving TLS on %s WITHOUT CLIENT AUTHENTICATION: anyone who can reach this port "
                "can join, train, submit updates and download the model; add --tls-ca "
                "(client certificates from fedserver certs) or --tokens FILE",
                address,
            )

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        bar = asyncio.create_task(  # a bar at a terminal, else "waiting for clients" lines
            show_progress(coordinator) if s.progress else log_waiting(coordinator)
        )
        watch = asyncio.create_task(_every_10s(files, service.joins))
        done = asyncio.create_task(coordinator.done.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            await coordinator.shut_down()
            code = EXIT_OK
        else:
            await _linger(coordinator, s.linger, stop)
            code = EXIT_FAILED if coordinator.failure else EXIT_OK
        done.cancel()
        stopped.cancel()
        watch.cancel()
        bar.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bar
    finally:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=2.0)
        if coordinator.publisher.tracker is not None:  # flushed within --track-timeout
            await asyncio.to_thread(coordinator.publisher.tracker.close, coordinator.failure)
        coordinator.store.close()
    log.info(
        "coordinator stopped after %d completed round(s); state in %s",
        coordinator.machine.rounds_completed,
        s.coordinator.state_dir,
    )
    return code


async def _every_10s(files: OpenFilesWatch, joins: JoinLog, every: float = 10.0) -> None:
    """Open files against their limit; the count of Joins a storm logged at DEBUG only."""
    while True:
        files.check()
        joins.flush()
        await asyncio.sleep(every)


def _live_state(c: Coordinator, files: OpenFilesWatch) -> dict[str, float]:
    m = c.machine
    return {
        "open_files": files.check(),
        "open_files_limit": files.limit,
        "current_round": m.round,
        "total_rounds": c.policy.total_rounds,
        "live_clients": m.live_count(),
        "updates_received": len(m.receipts),
        "updates_expected": m.expected_updates,
        "finished": float(c.state_name() == "finished"),
    }


def _describe_security(s: ServeSettings) -> str:
    if s.tls is None:
        transport = "plaintext"
    else:
        transport = "mTLS (client certificates required)" if s.tls.ca else "TLS"
    return transport + (f", bearer tokens from {s.tokens_file}" if s.tokens_file else "")


async def _linger(coordinator: Coordinator, linger: float, stop: asyncio.Event) -> None:
    """Keep answering until every client that may still be running has heard that training
    is over (the live ones and, after a restart, those of the run before), or --linger ends."""
    loop = asyncio.get_running_loop()
    until = loop.time() + linger
    untold = coordinator.untold_clients()
    if untold and linger > 0:
        log.info(
            "telling %d client(s) that training is finished (up to %.0fs)", len(untold), linger
        )
    while loop.time() < until and not stop.is_set():
        untold = coordinator.untold_clients()
        if not untold and not coordinator.awaiting_evaluations():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(0.2, until - loop.time()))
    if untold:
        log.info(
            "%d client(s) never came back to hear it: %s", len(untold), excerpts(sorted(untold))
        )
