"""The fedgrpc coordinator: serves the global model, collects updates, aggregates per round."""

from fedcore.logs import quiet_grpc

quiet_grpc()
