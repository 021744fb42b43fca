"""ServerApp and ClientApp for Flower's deployment engine (superlink + supernodes + flwr run).

Message API FedAvg (flwr.serverapp.strategy), no evaluation; the ServerApp writes the seconds
of each round to the run config's `out-path` when the strategy returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_bench.common import RoundClock, initial_arrays, updated

server = ServerApp()
client = ClientApp()


class TimedFedAvg(FedAvg):
    def __init__(self, clock: RoundClock, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clock = clock

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.clock.start()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        if result[0] is None:
            raise RuntimeError(f"round {server_round}: no valid replies")
        self.clock.stop()
        return result


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    clients = int(cfg["num-clients"])
    clock = RoundClock()
    strategy = TimedFedAvg(
        clock,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=clients,
        min_available_nodes=clients,
    )
    arrays = ArrayRecord(initial_arrays(int(cfg["num-params"])))
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(cfg["num-rounds"]))
    clock.write(str(cfg["out-path"]), clients=clients)


@client.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    content = RecordDict(
        {
            "arrays": ArrayRecord(updated(arrays)),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content=content, reply_to=msg)
