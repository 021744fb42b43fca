"""Talking to a running coordinator: `fedserver status --server` and `fedserver health`.

Both use the client-side TLS flags (the operator certificate from `fedserver certs`, or an
operator token), so they work against a coordinator that requires mTLS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.security import SecurityError, TlsFiles, add_tls_arguments, open_channel

SERVICE = "fedgrpc.v1.Coordinator"
_STATES = {
    pb.WAITING_FOR_CLIENTS: "waiting_for_clients",
    pb.TRAINING: "training",
    pb.FINISHED: "finished",
    pb.SHUTTING_DOWN: "shutting_down",
}


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    health = sub.add_parser(
        "health",
        help="gRPC health check of a running coordinator (exit 0 when SERVING)",
        description="For container healthchecks and scripts: exit 0 if the coordinator answers "
        "SERVING, 1 otherwise. With mTLS pass the operator certificate.",
    )
    health.add_argument("--config", type=Path, help="TOML file with a [server] table")
    health.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT (127.0.0.1:50051)")
    health.add_argument("--service", default=SERVICE, help=f"service to check ({SERVICE})")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (3)")
    add_tls_arguments(health, server=False)
    health.set_defaults(handler=check_health)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return open_channel(args.server, TlsFiles.from_args(args), args.token)


def check_health(args: argparse.Namespace) -> int:
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except SecurityError as e:
        print(f"fedserver health: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"fedserver health: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(name)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def live_status(args: argparse.Namespace) -> dict[str, Any]:
    """GetStatus of a running coordinator, shaped like `read_status` of a state dir."""
    with _channel(args) as channel:
        reply = pb_grpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
    return {
        "status": "failed" if reply.failure else _STATES.get(reply.state, "unknown"),
        "failure": reply.failure,  # why the run gave up ("" unless it did)
        "federation_id": reply.federation_id,
        "total_rounds": reply.total_rounds,
        "rounds_completed": reply.rounds_completed,
        "current_round": reply.current_round,
        "live_clients": reply.live_clients,
        "updates_received": reply.updates_received,
        "updates_expected": reply.updates_expected,
        "rounds": [
            {
                "round": r.round,
                "participants": r.participants,
                "num_examples": r.num_examples,
                "metrics": dict(r.metrics),
                "duration_seconds": round(r.duration_seconds, 4),
                "model_version": r.model_version,
            }
            for r in reply.rounds
        ],
        "rounds_omitted": reply.rounds_omitted,  # older rounds than the reply lists
    }
