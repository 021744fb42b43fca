"""Secure aggregation end to end: real coordinator and client processes over gRPC.

The same three clients (deterministic local training: fixed seeds, one torch thread) train two
federations from the same initial model, one plain and one with `--secure secagg`. The securely
aggregated models must equal plain FedAvg's within the fixed-point error (2^-25 per coordinate
per round, plus float32 rounding). Dropouts are covered in tests/test_secagg_protocol.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.procs import Proc, free_port, start_client, start_coordinator, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

ROUNDS = 2


def _federation(tmp_path: Path, name: str, procs: list[Proc], *extra: str) -> list[Proc]:
    port = free_port()
    logs = tmp_path / f"logs-{name}"
    server = start_coordinator(
        logs, port, tmp_path / name, "--rounds", str(ROUNDS), "--min-clients", "3",
        "--local-epochs", "1", *extra, name=f"server-{name}",
    )  # fmt: skip
    procs.append(server)
    wait_serving(port, server)
    clients = [start_client(logs, port, f"{i}/3", name=f"{name}-client-{i}") for i in range(3)]
    procs.extend(clients)
    return [server, *clients]


def test_secagg_model_equals_plain_fedavg(tmp_path: Path, procs: list[Proc]) -> None:
    plain = _federation(tmp_path, "plain", procs)
    secure = _federation(tmp_path, "secure", procs, "--secure", "secagg")
    for proc in plain[1:] + secure[1:]:
        assert proc.wait(200) == 0, proc.log()
    for server in (plain[0], secure[0]):
        assert server.wait(60) == 0, server.log()
    assert "secure aggregation with 2 peers (threshold 2)" in secure[1].log()

    for r in range(1, ROUNDS + 1):
        a = load_file(tmp_path / "plain" / "checkpoints" / f"round-{r:04d}.safetensors")
        b = load_file(tmp_path / "secure" / "checkpoints" / f"round-{r:04d}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            diff = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()
            # Round r compounds r rounds of 2^-25 fixed-point error plus float32 rounding.
            assert diff <= r * (2**-25 + 2**-22), (k, r, diff)
