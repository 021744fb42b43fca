"""One bench worker process: hundreds to thousands of asyncio virtual clients.

Each virtual client has its own channel and its own TCP connection to the coordinator (a local
subchannel pool: gRPC otherwise shares one connection among channels with the same target and
options, and 2,500 "clients" were 2,500 streams on one socket). It joins, long-polls
GetGlobalModel, checks the model's version, submits a fixed delta when selected, until FINISHED.
When the coordinator goes away (bench --kill-restart) it backs off with jitter, honouring a
`retry-after-ms` the coordinator sends, joins again and carries on, as fedclient does.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

import grpc

from bench.client import BenchClient
from fedclient.retry import RECONNECT_OPTIONS, Backoff, retry_after
from fedcore import checksums
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.wire import CHANNEL_OPTIONS, ModelCalls
from fedserver.transport.limits import raise_open_files_limit, tune_garbage_collector

OPTIONS = [*CHANNEL_OPTIONS, *RECONNECT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
# The coordinator restarting, or shedding a storm: come back. Anything else fails the bench.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# An upload whose connection dies (kill -9) while the client is writing reaches grpc.aio as this,
# not UNAVAILABLE (grpc/grpc#36066); fedclient retries INTERNAL too.
CORE_WRITE_FAILED = "Internal error from Core"


def _transient(e: grpc.aio.AioRpcError) -> bool:
    if e.code() == grpc.StatusCode.INTERNAL:
        return e.details() == CORE_WRITE_FAILED
    return e.code() in TRANSIENT


# An upload cut by a restart may be refused by the new process: pull again.
RESUBMIT = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED}

Latencies = dict[str, list[float]]


async def _session(
    calls: ModelCalls, client: BenchClient, lat: Latencies, rng: random.Random
) -> bool:
    """Poll and submit until FINISHED (True); raises AioRpcError on a failed call."""
    while True:
        t_header = 0.0
        async for msg in calls.pull(client.request(), timeout=330):
            if not t_header:
                t_header = time.perf_counter()
            client.take(msg)
        outcome = client.outcome()
        if outcome == client.FINISHED:
            return True
        if client.downloaded():
            lat["pull"].append(time.perf_counter() - t_header)
        if outcome != client.SUBMIT:
            continue
        t = time.perf_counter()
        if await _submit(calls, client, lat, rng):
            lat["submit"].append(time.perf_counter() - t)  # including any wait when shed


async def _submit(
    calls: ModelCalls, client: BenchClient, lat: Latencies, rng: random.Random
) -> bool:
    """Upload, coming back when the coordinator sheds the upload (UNAVAILABLE with a
    retry-after-ms); False if a restarted coordinator refused it (pull again)."""
    backoff = Backoff(initial=0.5, maximum=5.0, give_up_after=600, rng=rng)
    while True:
        try:
            await calls.submit(client.upload(), timeout=300)
            return True
        except grpc.aio.AioRpcError as e:
            if e.code() in RESUBMIT:
                lat["refused_after_restart"].append(0.0)
                return False
            delay = retry_after(e)
            if e.code() != grpc.StatusCode.UNAVAILABLE or not delay:
                raise
            lat["shed"].append(delay)
            await asyncio.sleep(backoff.next_delay(delay))


async def virtual_client(
    address: str, client_id: str, lat: Latencies, seed: int, arrival: float = 0.0
) -> None:
    rng = random.Random(seed)  # each client its own jitter: a shared seed would march in step
    await asyncio.sleep(rng.uniform(0.0, arrival))
    backoff = Backoff(initial=0.5, maximum=5.0, give_up_after=600, rng=rng)
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        calls = ModelCalls(channel)
        client: BenchClient | None = None
        # The first Join in two parts: the connection (TCP and HTTP/2 set-up, which in a storm
        # also waits for this process's CPU), then the RPC alone on the ready channel.
        t_start = time.perf_counter()
        await asyncio.wait_for(channel.channel_ready(), 300)
        lat["connect"].append(time.perf_counter() - t_start)
        while True:
            try:
                t = time.perf_counter()
                join = await stub.Join(
                    pb.JoinRequest(client_id=client_id), timeout=300, wait_for_ready=True
                )
                if client is None:
                    lat["join_rpc"].append(time.perf_counter() - t)
                    lat["join"].append(time.perf_counter() - t_start)  # connect + Join RPC
                    checksum = checksums.choose(join.checksums)
                    client = BenchClient(client_id, join.chunk_size, 1e-4, 30, checksum)
                else:
                    lat["rejoin"].append(time.perf_counter() - t)
                backoff.reset()
                if await _session(calls, client, lat, rng):
                    return
            except grpc.aio.AioRpcError as e:
                if not _transient(e):
                    raise
                lat["transient_errors"].append(0.0)
                await asyncio.sleep(backoff.next_delay(retry_after(e)))


async def run_worker(address: str, first: int, count: int, arrival: float = 0.0) -> Latencies:
    """Runs `count` clients; each arrives at a uniformly random time within `arrival` seconds
    (0: all at once) and measures its latencies from its own arrival."""
    raise_open_files_limit()  # one socket per virtual client
    # Each virtual client stands in for a device of its own, whose collector would not walk
    # 2,500 clients' objects: settings of a process with thousands of connections, as the
    # coordinator's.
    tune_garbage_collector()
    lat: Latencies = defaultdict(list)
    await asyncio.gather(
        *(
            virtual_client(address, f"v{first + i:05d}", lat, first + i, arrival)
            for i in range(count)
        )
    )
    return lat
