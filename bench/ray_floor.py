"""The memory floor of a Ray-based simulation: a local Ray started as `fedserver simulate` starts
it (fedserver/simulation/workers.py), two idle actors that import nothing beyond Ray, held for a
few seconds so bench/simulation.py's sampler sees its peak. Any simulation engine on a local Ray
of 2 workers pays at least this, whatever its clients do.

    python -m bench.ray_floor --ray-dir /tmp/rayX      # run by `bench.simulation --engines ray`
"""

from __future__ import annotations

import argparse
import os
import threading

import ray

from fedserver.simulation import workers
from fedserver.simulation.settings import RaySettings

HOLD_S = 3.0


@ray.remote
class Idle:
    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ray-dir", required=True)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    workers.start_ray(RaySettings(workers=args.workers, temp_dir=args.ray_dir))
    try:
        actors = [Idle.remote() for _ in range(args.workers)]  # type: ignore[attr-defined]
        ray.get([a.pid.remote() for a in actors])
        threading.Event().wait(HOLD_S)  # let the sampler see every process at its size
    finally:
        workers.stop_ray()


if __name__ == "__main__":
    main()
