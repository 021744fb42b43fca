"""The fedgrpc coordinator: serves the global model, collects updates, aggregates per round."""
