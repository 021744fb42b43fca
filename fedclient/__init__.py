"""The federated client: joins a coordinator, trains locally, pushes updates."""

from fedcore.logs import quiet_grpc

quiet_grpc()
