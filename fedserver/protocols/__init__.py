"""Ways a round runs (plain, secure aggregation, homomorphic): base.py is the interface,
registry.py maps `--secure` names to implementations, one module per implementation."""
