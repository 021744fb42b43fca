"""The federated client: joins a coordinator, trains locally, pushes updates."""
