"""Code shared by the coordinator and the clients: wire stubs, tensor codec, configuration."""
