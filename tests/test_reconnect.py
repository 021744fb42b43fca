"""A client whose channel cannot connect still finds a coordinator that is back on its port.

The client's Join waits for the channel (wait_for_ready) up to its deadline. A channel can stay
unable to connect while a coordinator serves on the same port: its connection attempt hangs on a
peer that took the TCP connection but never speaks HTTP/2 (a frozen or half-dead process, or a
gRPC client that failed to send its preface), and gRPC gives such an attempt at least 20 s
(`grpc.min_reconnect_backoff_ms`) before it tries again, whatever the reconnect backoff. Here a
raw socket plays that peer; the real coordinator is a gRPC server answering Join on the port
once the raw socket stops listening. The client must replace its channel when a Join ran out
its deadline, and so join within a few Join deadlines, not when the stuck attempt times out.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import fedclient.session
from fedclient.partition import Partition
from fedclient.session import ClientSession
from fedclient.settings import ClientSettings
from fedcore.proto import coordinator_pb2 as pb
from tests.procs import free_port

pytestmark = pytest.mark.timeout(120)

JOIN_DEADLINE = 2.0  # the client's Join deadline here (30 s in production)
GRPC_MIN_CONNECT_TIMEOUT = 20.0  # gRPC's default for one connection attempt


class Coordinator:
    """A gRPC server on 127.0.0.1:PORT that answers Join and records when it did."""

    def __init__(self, port: int) -> None:
        self.joined = threading.Event()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)]
        )
        handler = grpc.unary_unary_rpc_method_handler(
            self._join,
            request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinReply.SerializeToString,
        )
        service = grpc.method_handlers_generic_handler("fedgrpc.v1.Coordinator", {"Join": handler})
        self.server.add_generic_rpc_handlers((service,))
        assert self.server.add_insecure_port(f"127.0.0.1:{port}") == port
        self.server.start()
        self.started = time.monotonic()

    def _join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.joined.set()
        return pb.JoinReply(client_id=request.client_id, federation_id="f" * 32)


@pytest.fixture
def short_join(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fedclient.session, "JOIN_TIMEOUT", JOIN_DEADLINE)
    yield


def test_join_replaces_a_channel_stuck_connecting(short_join: None) -> None:
    port = free_port()
    # The peer that takes the connection and never answers: SO_REUSEADDR, as gRPC's own
    # sockets, so that the coordinator can bind the port while the taken connection lives.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    settings = ClientSettings(
        server=f"127.0.0.1:{port}", partition=Partition(0, 1), client_id="c", give_up_after=90
    )
    session = ClientSession(settings, task=None)  # type: ignore[arg-type]
    # Still referenced, as by a round's protocol handler holding a stub on it: without
    # subchannels of its own, a replacement channel got this one's stuck subchannel back.
    first_channel = session.channel
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            session._call("join", lambda: None)
            outcome.append(None)
        except BaseException as e:  # reported by the assertion below
            outcome.append(e)

    worker = threading.Thread(target=join, daemon=True)
    worker.start()
    listener.settimeout(30)
    taken, _ = listener.accept()  # the channel's connection attempt, now hanging
    listener.close()
    coordinator = Coordinator(port)
    try:
        assert coordinator.joined.wait(60), "the client never reached the coordinator"
        took = time.monotonic() - coordinator.started
        worker.join(30)
        assert outcome == [None]
        assert session.joined
        assert session.channel is not first_channel
        # One Join deadline, the retry backoff (< 1 s at this point) and a fresh connection:
        # well under the 20 s the stuck attempt would otherwise hold the channel.
        assert took < GRPC_MIN_CONNECT_TIMEOUT / 2, f"joined {took:.1f}s after it was back"
    finally:
        session.stop.set()
        coordinator.server.stop(None)
        taken.close()
