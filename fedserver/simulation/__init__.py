"""`fedserver simulate`: the production coordinator driving thousands of virtual clients.

cli.py (flags: run's own plus the simulation's), api.py (`run(...)`: the same from Python,
returning the history), driver.py (the loop), inprocess.py (the
in-process transport: drives the coordinator through coordinator/api.py, as the gRPC
servicer does), embedded.py / embedded_worker.py / frames.py (the default engine: local worker
processes, the model in shared memory), workers.py (Ray actors; the only module importing ray).
See docs/simulation.md.
"""
