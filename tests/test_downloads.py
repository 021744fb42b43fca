"""One client identity cannot hold the model downloads of everyone else: at most
--max-pulls-per-client open at once (RESOURCE_EXHAUSTED beyond), and a download that stops
reading loses its send slot after --send-stall-timeout. A real coordinator with a 4.9 MB model,
bearer tokens (the identity is the token's name) and the send slots lowered to 2; an attacker
that reads only the header of each stream."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.security import TOKEN_METADATA, TOKEN_SCHEME
from fedcore.wire import CHANNEL_OPTIONS
from fedserver.security.tokens import add_token
from tests.procs import Proc, free_port, start_coordinator, wait_serving
from tests.raw_client import pull

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Each client on its own TCP connection (gRPC otherwise shares one among a process's channels,
# and the attacker's stalled streams would block the honest one at the connection's window).
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
# The attacker keeps gRPC's smallest windows: its streams stall after a few kB.
ATTACKER_OPTIONS = [*CHANNEL_OPTIONS, OWN_CONNECTION, ("grpc.http2.bdp_probe", 0)]
STREAMS = 20


def test_one_identity_opening_many_stalled_pulls_cannot_stall_an_honest_client(
    tmp_path: Path, procs: list[Proc]
) -> None:
    tokens = tmp_path / "tokens.json"
    as_attacker = [(TOKEN_METADATA, TOKEN_SCHEME + add_token(tokens, "attacker"))]
    as_honest = [(TOKEN_METADATA, TOKEN_SCHEME + add_token(tokens, "honest"))]
    port = free_port()
    server = start_coordinator(
        tmp_path / "logs",
        port,
        tmp_path / "state",
        *("--min-clients", "2", "--rounds", "1", "--round-timeout", "600"),
        *("--max-model-sends", "2", "--max-pulls-per-client", "2"),
        *("--send-stall-timeout", "2", "--tokens", str(tokens)),
        task="tests.big_task:task",
    )
    procs.append(server)
    wait_serving(port, server)
    address = f"127.0.0.1:{port}"
    with (
        grpc.insecure_channel(address, options=ATTACKER_OPTIONS) as bad,
        grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, OWN_CONNECTION]) as good,
    ):
        attacker, honest = pb_grpc.CoordinatorStub(bad), pb_grpc.CoordinatorStub(good)
        attacker.Join(pb.JoinRequest(client_id="attacker"), timeout=30, metadata=as_attacker)
        honest.Join(pb.JoinRequest(client_id="honest"), timeout=30, metadata=as_honest)

        # Open streams, read each one's header and never read on: two are served (and stall),
        # the rest are refused at once.
        request = pb.GetGlobalModelRequest(client_id="attacker", wait_seconds=30)
        held, refused = [], []
        for _ in range(STREAMS):
            call = attacker.GetGlobalModel(request, timeout=240, metadata=as_attacker)
            try:
                first = next(call)
            except grpc.RpcError as e:
                refused.append((e.code(), e.details()))
                continue
            assert first.header.selected and first.header.total_bytes > 4_000_000
            held.append(call)
        assert len(held) == 2, (len(held), refused[:1])
        assert len(refused) == STREAMS - 2
        for code, details in refused:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already has 2 model downloads open" in details
            assert "--max-pulls-per-client" in details

        # The honest client gets the whole model, exact (the assembler checks its version),
        # once the stalled streams lost their send slots.
        header, model = pull(honest, "honest", wait_seconds=30, timeout=120, metadata=as_honest)
        assert header.selected and model is not None
        assert model.version == header.model_version

        status = honest.GetStatus(pb.GetStatusRequest(), timeout=30, metadata=as_honest)
        assert status.rejections["too_many_pulls"] == STREAMS - 2
        assert status.rejections["download_stalled"] >= 1
        for call in held:
            call.cancel()
    assert "Traceback" not in server.log()
