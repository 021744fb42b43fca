"""Join admits only clients that can train this coordinator's model, and one live peer per
client id; clients started without an id get one of their own (issue 28, items 2 and 4)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedserver.transport.admission import Admission, _host
from tests.procs import REPO, Proc, free_port, spawn, start_serving, wait_finished, wait_serving

pytestmark = pytest.mark.timeout(240)
# A channel of its own (own TCP connection): gRPC otherwise shares one between channels to the
# same target, and two "processes" would come from one peer address.
OWN = [("grpc.use_local_subchannel_pool", 1)]


def join(target: str, client_id: str, **fields: str) -> pb.JoinReply:
    with grpc.insecure_channel(target, options=OWN) as channel:
        return pb_grpc.CoordinatorStub(channel).Join(
            pb.JoinRequest(client_id=client_id, **fields), timeout=30
        )


def refusal(target: str, client_id: str, **fields: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        join(target, client_id, **fields)
    return info.value


@pytest.mark.integration
def test_join_refuses_another_model_and_a_second_host_claiming_a_live_id(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    # Listening on both IPv4 and IPv6 loopback: two "hosts" on one machine.
    server = start_serving(procs, tmp_path / "logs", port, tmp_path / "state", "--host", "[::]")
    v4, v6 = f"127.0.0.1:{port}", f"[::1]:{port}"

    join(v4, "dup", instance="first")
    e = refusal(v6, "dup", instance="second")
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    assert re.search(
        r"client id 'dup' is already live from \[?(::ffff:)?127\.0\.0\.1\]?:\d+ \(seen 0 s ago\); "
        r"this Join came from \[::1\]:\d+: give each client its own --client-id",
        e.details(),
    ), e.details()
    join(v4, "dup", instance="third")  # the same host again: a restarted client rejoins at once
    join(v6, "dup", instance="third")  # the same process on a new route (IPv4, then IPv6)
    e = refusal(v4, "dup")  # and back to IPv4 without an instance (an older client): refused
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    join(v6, "other")

    join(v6, "old-client")  # no fingerprint (an older client): not checked
    fingerprint = "0" * 64
    e = refusal(v4, "stranger", task="other:task", model_fingerprint=fingerprint)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        "client 'stranger' runs task 'other:task' with model fingerprint 000000000000, but this "
        "coordinator runs task examples.digits:task with model fingerprint "
    ) in e.details()
    wait_serving(port, server)  # still serving
    log = server.log()
    assert log.count("Join refused (ALREADY_EXISTS)") == 2
    assert log.count("Join refused (FAILED_PRECONDITION)") == 1
    assert "Traceback" not in log


@pytest.mark.integration
def test_a_client_of_another_model_exits_with_both_named(tmp_path: Path, procs: list[Proc]) -> None:
    shutil.copy(REPO / "tests" / "newcomer_task.py", tmp_path / "blobs.py")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    port = free_port()
    logs = tmp_path / "logs"
    start_serving(procs, logs, port, tmp_path / "state", task="blobs:task", env=env)
    args = ["-m", "fedclient.cli", "run", "--server", f"127.0.0.1:{port}", "--task", "blobs:wide"]
    client = spawn("client", [*args, "--threads", "1"], logs, env)
    procs.append(client)
    assert client.wait(60) == 1, client.log()
    log = client.log()
    assert re.search(
        r"coordinator refused this client \(FAILED_PRECONDITION\): client '[^']+' runs task "
        r"'blobs:wide' with model fingerprint [0-9a-f]{12}, but this coordinator runs task "
        r"blobs:task with model fingerprint [0-9a-f]{12} \(2 tensors: weight:float32\[3, 4\], "
        r"bias:float32\[3\]\): start the client with --task blobs:task",
        log,
    ), log
    assert "retrying" not in log
    assert "Missing key" not in log and "Traceback" not in log


@pytest.mark.integration
def test_clients_started_without_ids_on_one_host_are_distinct(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Three `fedclient run` without --partition or --client-id: three clients, one round."""
    port = free_port()
    logs = tmp_path / "logs"
    server = start_serving(
        procs, logs, port, tmp_path / "state", "--min-clients", "3", "--rounds", "1"
    )
    args = ["-m", "fedclient.cli", "run", "--server", f"127.0.0.1:{port}"]
    args += ["--task", "examples.digits:task", "--threads", "1", "--give-up-after", "60"]
    clients = [spawn(f"client-{i}", args, logs) for i in range(3)]
    procs.extend(clients)
    wait_finished(server, clients, 180)
    ids = set(re.findall(r"client (\S+-0of1-pid\d+) joined from", server.log()))
    assert len(ids) == 3, server.log()


def _admission(last_seen: dict[str, float], now: float) -> Admission:
    ttl = 90.0

    def seen_ago(client_id: str) -> float | None:  # as Coordinator.seen_ago, on a fixed clock
        seen = last_seen.get(client_id)
        return None if seen is None or now - seen > ttl else now - seen

    coordinator = SimpleNamespace(
        seen_ago=seen_ago, live_ids=lambda: set(last_seen), policy=SimpleNamespace(client_ttl=ttl)
    )
    return Admission(coordinator)  # type: ignore[arg-type]


def test_an_id_is_free_again_once_its_holder_stopped_answering() -> None:
    last_seen = {"a": 100.0}
    assert _admission(last_seen, 100.0).claim("a", "ipv4:10.0.0.1:5000") is None
    admission = _admission(last_seen, 150.0)
    admission.peers["a"] = ("ipv4:10.0.0.1:5000", "one")
    refused = admission.claim("a", "ipv4:10.0.0.2:6000", "two")
    assert refused is not None
    assert "already live from 10.0.0.1:5000 (seen 50 s ago); this Join came from 10.0.0.2:6000" in (
        refused
    )
    assert "the id is free again in 40 s" in refused
    assert admission.claim("a", "ipv4:10.0.0.1:7000", "two") is None  # its own host: a restart
    assert admission.claim("a", "ipv4:10.0.0.3:7000", "two") is None  # that process, moved
    later = _admission({"a": 100.0}, 191.0)  # 91 s of silence: no longer live
    later.peers["a"] = ("ipv4:10.0.0.1:5000", "one")
    assert later.claim("a", "ipv4:10.0.0.2:6000", "two") is None
    assert later.peers["a"] == ("ipv4:10.0.0.2:6000", "two")


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.5:41234", "10.0.0.5"),
        ("ipv6:[::1]:41234", "::1"),
        ("ipv6:%5B::1%5D:41234", "::1"),
        ("ipv6:[::ffff:127.0.0.1]:41234", "127.0.0.1"),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert _host(peer) == host
