"""Many clients: >= 1000 virtual clients in a few processes through rounds of a small model.

Each worker process runs hundreds of asyncio gRPC clients, each with its own channel (its own
TCP connection to the coordinator, as separate machines would have): Join, long-poll
GetGlobalModel, verify the model's version, SubmitUpdate a fixed delta, until FINISHED. Reports
p50/p99 latency per RPC and the coordinator's round times.

    python -m bench.many_clients                          # 1000 clients, 4 processes, 3 rounds
    python -m bench.many_clients --clients 200 --procs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.client import BenchClient
from bench.round_overhead import ProcWatch
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.wire import CHANNEL_OPTIONS, ModelCalls
from fedserver.store import read_status
from tests.procs import REPO, free_port, spawn, start_coordinator, wait_serving


async def _client(address: str, client_id: str, lat: dict[str, list[float]]) -> None:
    async with grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS)) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        calls = ModelCalls(channel)
        t = time.perf_counter()
        join = await stub.Join(
            pb.JoinRequest(client_id=client_id), timeout=300, wait_for_ready=True
        )
        lat["join"].append(time.perf_counter() - t)
        client = BenchClient(client_id, join.chunk_size, 1e-4, poll=30)
        while True:
            t_header = 0.0
            async for msg in calls.pull(client.request(), timeout=330):
                if not t_header:
                    t_header = time.perf_counter()
                client.take(msg)
            outcome = client.outcome()
            if outcome == client.FINISHED:
                return
            if client.downloaded():
                lat["download"].append(time.perf_counter() - t_header)
            if outcome != client.SUBMIT:
                continue
            t = time.perf_counter()
            await calls.submit(client.upload(), timeout=300)
            lat["submit"].append(time.perf_counter() - t)


async def _worker(address: str, first: int, count: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = defaultdict(list)
    await asyncio.gather(*(_client(address, f"v{first + i:05d}", lat) for i in range(count)))
    return lat


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"n": len(values), "p50": q[49], "p99": q[98], "max": max(values)}


def run(clients: int, procs: int, params: int, rounds: int, work: Path) -> dict[str, Any]:
    port = free_port()
    server = start_coordinator(
        work,
        port,
        work / "state",
        "--rounds",
        str(rounds),
        "--min-clients",
        str(clients),
        "--round-timeout",
        "600",
        "--linger",
        "60",
        task=f"bench.synthetic:params_{params}",
    )
    watch = ProcWatch(server.popen.pid)
    workers = []
    try:
        wait_serving(port, server)
        per = -(-clients // procs)
        for w in range(procs):
            first, count = w * per, min(per, clients - w * per)
            args = ["-m", "bench.many_clients", "worker", "--server", f"127.0.0.1:{port}"]
            args += ["--first", str(first), "--count", str(count)]
            args += ["--stats", str(work / f"lat-{w}.json")]
            workers.append(spawn(f"worker-{w}", args, work))
        for p in workers:
            if p.wait(1200) != 0:
                raise RuntimeError(f"{p.name} failed:\n{p.log()[-3000:]}")
        watch.read()
        if server.wait(120) != 0:
            raise RuntimeError(f"coordinator failed:\n{server.log()[-3000:]}")
    finally:
        for p in [server, *workers]:
            p.kill()
        watch.stop()
    lat: dict[str, list[float]] = defaultdict(list)
    for w in range(procs):
        for k, v in json.loads((work / f"lat-{w}.json").read_text()).items():
            lat[k] += v
    status = read_status(work / "state")
    return {
        "clients": clients,
        "procs": procs,
        "params": params,
        "rounds": [r["duration_seconds"] for r in status["rounds"]],
        "participants": [r["participants"] for r in status["rounds"]],
        "latency": {k: percentiles(v) for k, v in sorted(lat.items())},
        "coordinator_peak_rss_bytes": watch.peak,
        "coordinator_cpu_seconds": watch.cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.many_clients", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="(internal) one process of virtual clients")
    worker.add_argument("--server", required=True)
    worker.add_argument("--first", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.command == "worker":
        lat = asyncio.run(_worker(args.server, args.first, args.count))
        args.stats.write_text(json.dumps(lat))
        return 0
    with tempfile.TemporaryDirectory(prefix="fedgrpc-many-") as tmp:
        result = run(args.clients, args.procs, args.params, args.rounds, Path(tmp))
    print(f"{args.clients} clients in {args.procs} processes, {args.params} params")
    print("round seconds:", " ".join(f"{s:.2f}" for s in result["rounds"]))
    print("participants:", result["participants"])
    for kind, q in result["latency"].items():
        print(
            f"{kind:>9}: n={q['n']} p50={q.get('p50', 0) * 1e3:.1f} ms "
            f"p99={q.get('p99', 0) * 1e3:.1f} ms max={q.get('max', 0) * 1e3:.1f} ms"
        )
    print(f"coordinator peak RSS {result['coordinator_peak_rss_bytes'] / 1e6:.0f} MB")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"many_clients-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
