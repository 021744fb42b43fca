"""`make demo-async`: 10 clients on digits, 3 of them 10x slower, asynchronous vs synchronous.

The same 10 client processes' speeds race twice on this machine: synchronous FedAvg with a
round deadline, then buffered asynchronous aggregation (`--mode async`, FedBuff). Each race
stops once a published model reaches 0.95 held-out accuracy; both times are printed. The slow
clients are made slow with `fedclient run --slowdown 10` (a testing aid). For the full
comparison (over-selection too, a log-normal speed spread, JSON) run bench/async_vs_sync.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.async_vs_sync import race, settings

CLIENTS, SLOW, TARGET = 10, 3, 0.95
# Every client 10x slower than this host (digits trains in milliseconds here), the slow ones
# 10x more: compute, not the RPC round trip, dominates a round, as on real devices. The 7 fast
# clients here are equally fast and finish together: K = 3 took 2.9 s twice where K = 2 took
# 3.6-10 s (their deltas land 2-3 versions stale and are damped) and K = 5 3.4-3.6 s.
BASE_SLOWDOWN, DEADLINE, BUFFER_SIZE = 10.0, 1.0, 3


def main() -> int:
    slowdowns = [BASE_SLOWDOWN * (10.0 if i < SLOW else 1.0) for i in range(CLIENTS)]
    chosen = settings([DEADLINE], [BUFFER_SIZE], max_staleness=10)
    sync_name, async_name = f"sync-deadline-{DEADLINE:g}", f"async-{BUFFER_SIZE}"
    print(f"demo-async: {CLIENTS} clients on digits, {SLOW} of them 10x slower; target {TARGET}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="demo-async-") as tmp:
        for name in (sync_name, async_name):
            print(f"demo-async: racing {name} ({' '.join(chosen[name])}) ...", flush=True)
            r = race(name, chosen[name], slowdowns, TARGET, 600.0, Path(tmp))
            results[name] = r
            shown = f"{r['seconds']:.1f}s" if r.get("reached") else "not reached"
            print(
                f"demo-async: {name}: {shown}, {r.get('rounds', 0)} versions, "
                f"{r.get('updates', 0)} updates, accuracy {r.get('accuracy', 0.0):.4f}"
            )
    sync, fast = results[sync_name], results[async_name]
    if sync.get("reached") and fast.get("reached"):
        print(f"demo-async: async reached {TARGET} {sync['seconds'] / fast['seconds']:.1f}x sooner")
        print(f"demo-async: async staleness (versions behind: updates): {fast['staleness']}")
    return 0 if fast.get("reached") else 1


if __name__ == "__main__":
    sys.exit(main())
