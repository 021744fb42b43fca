"""A submit whose reply is lost is retried by the real client and counted exactly once.

Two identical federations (2 clients, 2 rounds) run side by side; in one the coordinator drops
the reply to the first update it counts (FEDGRPC_FAULT=reply:1), so that client's retry path
resubmits the same bytes. Training is seeded and FedAvg over two updates does not depend on
arrival order, so if the retry had been counted twice the final models would differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.procs import Proc, free_port, start_client, start_coordinator, status_json, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _federations(root: Path, procs: list[Proc], envs: dict[str, dict[str, str]]) -> None:
    """Start one coordinator + 2 clients per entry, all at once, and wait for all to finish."""
    runs = []
    for name, env in envs.items():
        port = free_port()
        flags = ("--rounds", "2", "--min-clients", "2")
        server = start_coordinator(
            root / name / "logs", port, root / name / "state", *flags, env=env
        )
        procs.append(server)
        runs.append((port, server))
    for port, server in runs:
        wait_serving(port, server)
        clients = [start_client(server.log_path.parent, port, f"{i}/2") for i in range(2)]
        procs.extend(clients)
    for proc in procs:
        assert proc.wait(180) == 0, proc.log()


def test_lost_reply_is_retried_and_counted_once(tmp_path: Path, procs: list[Proc]) -> None:
    markers = tmp_path / "faults"
    markers.mkdir()
    fault_env = {"FEDGRPC_FAULT": "reply:1", "FEDGRPC_FAULT_DIR": str(markers)}
    _federations(tmp_path, procs, {"faulty": fault_env, "clean": {}})

    assert (markers / "reply-1.hit").exists()
    logs = "".join(p.log() for p in procs if "faulty" in str(p.log_path) and p.name != "server")
    assert "reply dropped" in logs  # the client saw UNAVAILABLE and retried...
    assert "round 1: update was already counted" in logs  # ...and the retry was acknowledged

    got, want = (
        status_json(tmp_path / "faulty" / "state"),
        status_json(tmp_path / "clean" / "state"),
    )
    assert [r["participants"] for r in got["rounds"]] == [2, 2]
    assert [r["num_examples"] for r in got["rounds"]] == [r["num_examples"] for r in want["rounds"]]
    # Bit-identical models: the retried update entered the average once, with its own weight.
    assert [r["model_version"] for r in got["rounds"]] == [
        r["model_version"] for r in want["rounds"]
    ]
