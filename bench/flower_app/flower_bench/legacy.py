"""Flower's legacy gRPC path: `start_server` (one process) and `start_client` (one per client).

Deprecated since flwr 1.13 but still shipped in 1.41; it is the bidirectional-streaming gRPC
transport Flower used before the SuperLink. Run with .venv-flower's python:

    python -m flower_bench.legacy server --port 8080 --clients 8 --params 10000000 \
        --rounds 3 --out rounds.json
    python -m flower_bench.legacy client --port 8080
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from flwr.client import NumPyClient, start_client
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.server import ServerConfig, start_server
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from flower_bench.common import RoundClock, initial_arrays, updated


class TimedFedAvg(FedAvg):
    def __init__(self, clock: RoundClock, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clock = clock

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.clock.start()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} failed clients")
        result = super().aggregate_fit(server_round, results, failures)
        self.clock.stop()
        return result


class NoTrainClient(NumPyClient):
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        return updated(parameters), 1, {}


def serve(port: int, clients: int, params: int, rounds: int, out: str) -> None:
    clock = RoundClock()
    strategy = TimedFedAvg(
        clock,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_evaluate_clients=0,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(initial_arrays(params)),
    )
    start_server(
        server_address=f"127.0.0.1:{port}",
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    clock.write(out, clients=clients)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flower_bench.legacy", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--clients", type=int, required=True)
    server.add_argument("--params", type=int, required=True)
    server.add_argument("--rounds", type=int, required=True)
    server.add_argument("--out", required=True)
    client = sub.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.role == "server":
        serve(args.port, args.clients, args.params, args.rounds, args.out)
    else:
        start_client(
            server_address=f"127.0.0.1:{args.port}",
            client=NoTrainClient().to_client(),
            insecure=True,
            max_wait_time=120,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
