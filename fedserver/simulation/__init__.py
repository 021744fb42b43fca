"""`fedserver simulate`: the production coordinator driving thousands of virtual clients on Ray.

cli.py (flags: run's own plus the simulation's), driver.py (the loop), seam.py (the one
adapter to coordinator internals), workers.py (Ray actors; the only module importing ray).
See docs/simulation.md.
"""
