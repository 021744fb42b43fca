"""Generated gRPC stubs for protos/fedgrpc/v1/coordinator.proto (regenerate with `make proto`)."""
