"""ServerApp and ClientApp for Flower's deployment engine (superlink + supernodes + flwr run).

Message API FedAvg (flwr.serverapp.strategy), no evaluation; the ServerApp writes the seconds
of each round to the run config's `out-path` when the strategy returns.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flower_bench.common import RoundClock, TimedFedAvg, initial_arrays, updated

server = ServerApp()
client = ClientApp()


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
