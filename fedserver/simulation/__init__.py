"""`fedserver simulate`: the production coordinator driving thousands of virtual clients on Ray.

cli.py (flags: run's own plus the simulation's), driver.py (the loop), inprocess.py (the
in-process transport: drives the coordinator through coordinator/api.py, as the gRPC
servicer does), workers.py (Ray actors; the only module importing ray).
See docs/simulation.md.
"""
