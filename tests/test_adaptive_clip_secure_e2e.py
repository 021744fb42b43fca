"""Adaptive DP clipping (client side) under secure aggregation and HE, end to end: real
coordinator and client processes. Each client's bit b_i = [||delta_i|| <= C_t] travels masked
(or encrypted) as the last value of its update, so only the sum of the counted clients' bits is
revealed. With z = 0 and sigma_b = 0 (no noise) every round's recorded fraction must be exactly
what the clients' own updates imply, recomputed here from the round's base checkpoint with the
clients' seeds."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from examples.digits import task
from fedclient.local_update import round_seed
from fedclient.partition import Partition
from fedclient.task import TrainConfig
from fedcore.tensors import flatten_state_dict, float_vector, to_state_dict
from tests.procs import (
    Proc,
    free_port,
    start_client,
    start_clients,
    start_serving,
    status_json,
    wait_finished,
    wait_until,
)
from tests.test_adaptive_clip_e2e import Z
from tests.test_adaptive_clip_e2e import _check_rounds as check_rounds

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

NO_NOISE = ("--dp-noise-multiplier", "0", "--dp-clipped-count-stddev", "0")


def _norms(state: Path, round_number: int, n: int, clients: list[int]) -> list[float]:
    """The L2 norms of the clients' unclipped updates in a round, trained exactly as they did."""
    model = task.build_model()
    model.load_state_dict(
        load_file(state / "checkpoints" / f"round-{round_number - 1:04d}.safetensors")
    )
    base = flatten_state_dict(model.state_dict())
    defaults = task.default_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the clients ran with --threads 1
    norms = []
    try:
        for i in clients:
            data = task.load_partition(Partition.parse(f"{i}/{n}", scheme="iid", seed=0))
            config = TrainConfig(
                local_epochs=1,
                lr=defaults.lr,
                batch_size=defaults.batch_size,
                seed=round_seed(0, f"client-{i}", round_number),
            )
            torch.manual_seed(config.seed)
            model.load_state_dict(to_state_dict(base))
            task.train(model, data.train, config)
            delta = float_vector(flatten_state_dict(model.state_dict())) - float_vector(base)
            norms.append(float(np.linalg.norm(delta.astype(np.float64))))
    finally:
        torch.set_num_threads(threads)
    return norms


def _check_round(state: Path, r: dict, n: int, clients: list[int], tolerance: float = 1e-6) -> int:
    """The round's recorded fraction and next clip are what the clients' bits imply; returns
    how many bits were 1."""
    m = r["metrics"]
    norms = _norms(state, r["round"], n, clients)
    within = sum(x <= m["dp_clip"] for x in norms)
    # The sum of exactly the survivors' bits, over their count (not the clients selected).
    expected = within / len(clients)
    assert m["dp_within_clip_fraction"] == pytest.approx(expected, abs=tolerance), norms
    step = math.exp(-0.2 * (within / len(clients) - 0.5))  # default lr 0.2, quantile 0.5
    assert m["dp_clip_next"] == pytest.approx(m["dp_clip"] * step, rel=tolerance)
    assert not [k for k in m if k.startswith("client_dp")]  # no client's bit is recorded
    return within


@pytest.mark.parametrize("secure", ["secagg", "he"])
def test_client_side_adaptive_clip_counts_the_masked_bits(
    tmp_path: Path, procs: list[Proc], secure: str
) -> None:
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    server_extra: list[str] = []
    client_extra: list[str] = []
    tolerance = 1e-6  # secagg's fixed point: 2^-25 per coordinate
    if secure == "he":
        pytest.importorskip("tenseal")
        from fedcore.he import PUBLIC_FILE, generate_keys

        secret, public = generate_keys(tmp_path / "keys")
        moved = tmp_path / "coordinator" / PUBLIC_FILE
        moved.parent.mkdir()
        public.rename(moved)
        server_extra, client_extra = ["--he-public-key", str(moved)], ["--he-key", str(secret)]
        tolerance = 1e-4  # CKKS noise on the decrypted sum
    server = start_serving(
        procs, logs, port, state, "--rounds", "3", "--min-clients", "3", "--local-epochs", "1",
        "--secure", secure, *server_extra, "--dp-adaptive-clip", "client", *NO_NOISE,
        "--dp-initial-clip", "0.9",
    )  # fmt: skip
    wait_finished(server, start_clients(procs, logs, port, 3, *client_extra), 250)
    rounds = status_json(state)["rounds"]
    assert [r["participants"] for r in rounds] == [3, 3, 3]
    assert rounds[0]["metrics"]["dp_clip"] == 0.9
    for prev, r in itertools.pairwise(rounds):
        assert r["metrics"]["dp_clip"] == pytest.approx(prev["metrics"]["dp_clip_next"])
    within = [_check_round(state, r, 3, [0, 1, 2], tolerance) for r in rounds]
    assert any(0 < k < 3 for k in within), within  # C0 = 0.9 splits round 1's norms


def test_a_client_killed_after_masking_leaves_its_bit_out_of_the_count(
    tmp_path: Path, procs: list[Proc]
) -> None:
    n, dropped = 4, 2
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    marker = tmp_path / "faults"
    marker.mkdir()
    # The dead client stays selected: the round closes once it has been silent for
    # --client-timeout (the 45 s deadline is only the fallback), and the linger need not wait
    # for it either. Live clients stay heard: heartbeats every 10/3 s while training, and stage
    # long-polls of --poll-seconds 3 while waiting for their peers.
    server = start_serving(
        procs, logs, port, state, "--rounds", "1", "--min-clients", str(n), "--min-fit", "3",
        "--local-epochs", "1", "--round-timeout", "45", "--secure", "secagg",
        "--dp-adaptive-clip", "client", *NO_NOISE, "--dp-initial-clip", "0.9",
        "--client-timeout", "10",
    )  # fmt: skip
    clients = {}
    for i in range(n):
        fault = {"FEDGRPC_FAULT": "upload:1", "FEDGRPC_FAULT_DIR": str(marker)}
        env = fault if i == dropped else None
        clients[i] = start_client(logs, port, f"{i}/{n}", "--poll-seconds", "3", env=env)
    procs.extend(clients.values())
    # Masked (bit included) and mid-upload: kill -9 exactly there.
    wait_until(lambda: (marker / "upload-1.hit").exists(), 240, f"client {dropped} upload")
    clients[dropped].kill()
    wait_finished(server, [c for i, c in clients.items() if i != dropped], 240)
    assert "1 dropped after the key exchange" in server.log()
    (r,) = status_json(state)["rounds"]
    assert r["participants"] == n - 1
    within = _check_round(state, r, n, [i for i in range(n) if i != dropped])
    assert within > 0  # so that k/3 (survivors) and k/4 (selected) differ


def test_noised_masked_count_is_accounted_as_the_combined_mechanism(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """With noise: the clients add the update's and the count's shares (the coordinator adds
    none), ε is Opacus' for the combined z, and the clip moves every round."""
    port, state, logs = free_port(), tmp_path / "state", tmp_path / "logs"
    server = start_serving(
        procs, logs, port, state, "--rounds", "3", "--min-clients", "3", "--local-epochs", "1",
        "--secure", "secagg", "--dp-adaptive-clip", "client", "--dp-noise-multiplier", str(Z),
        "--dp-clipped-count-stddev", "1.0",
    )  # fmt: skip
    wait_finished(server, start_clients(procs, logs, port, 3), 250)
    check_rounds(status_json(state)["rounds"], 0.1, 3)
