"""Ways a round's contributions become its aggregate (plain, secure aggregation,
homomorphic, buffered): base.py is the interface, registry.py maps names to
implementations, one module per implementation; secagg_stages.py is SecAgg's pure
stage machine; dp.py is client-level DP as a wrapper around any of them (--dp-clip)."""
