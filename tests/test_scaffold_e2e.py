"""SCAFFOLD with real processes over real gRPC: c travels beside the model, Δc beside Δy, each
client keeps c_i in its --state-dir, and the coordinator's c (checkpointed with the strategy
state) ends as the clients' c_i averaged by their examples, as full participation implies
(c ← c + mean Δc from c = c_i = 0). Plus the refusals at start-up and on the client."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from examples.digits import task
from fedclient.partition import Partition
from fedclient.scaffold import STATE_FILE
from fedcore.files import read_safetensors
from fedcore.tensors import float_vector
from fedserver.state.store import StateStore
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    start_client,
    start_serving,
    status_json,
    wait_finished,
)

CLIENTS = 2
ROUNDS = 3
NON_IID = ("--partitioner", "dirichlet", "--alpha", "0.3")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def run_rounds(
    tmp: Path,
    procs: list[Proc],
    rounds: int,
    secure: str,
    server_extra: tuple[str, ...] = (),
    client_extra: tuple[str, ...] = (),
) -> Proc:
    """A coordinator on tmp/state (a new run, or the run there resumed up to `rounds`) and
    CLIENTS fresh client processes keeping c_i in tmp/client-I, until training finishes."""
    port = free_port()
    server = start_serving(
        procs, tmp / "logs", port, tmp / "state", "--strategy", "scaffold",
        "--rounds", str(rounds), "--min-clients", str(CLIENTS), "--local-epochs", "1",
        "--secure", secure, *server_extra, name=f"server-{rounds}",
    )  # fmt: skip
    clients = []
    for i in range(CLIENTS):
        state_dir = ("--state-dir", str(tmp / f"client-{i}"), *client_extra)
        name = f"client-{i}-{rounds}"
        partition = f"{i}/{CLIENTS}"
        clients.append(start_client(tmp / "logs", port, partition, *NON_IID, *state_dir, name=name))
    procs.extend(clients)
    wait_finished(server, clients, 240)
    return server


def check_c_is_the_weighted_mean_of_c_i(tmp: Path, rounds: int, atol: float = 1e-6) -> None:
    status = status_json(tmp / "state")
    assert status["strategy"] == "scaffold" and len(status["rounds"]) == rounds
    # Each client's c_i, on disk, tagged with this federation and the client's id.
    c_i, weights = [], []
    for i in range(CLIENTS):
        flat, meta = read_safetensors(tmp / f"client-{i}" / STATE_FILE)
        assert meta == {"federation_id": status["federation_id"], "client_id": f"client-{i}"}
        c_i.append(float_vector(flat))
        partition = Partition(i, CLIENTS, "dirichlet", 0.3, 0)
        weights.append(float(len(task.load_partition(partition).train)))  # type: ignore[arg-type]
    assert all(np.abs(c).max() > 0 for c in c_i)
    store = StateStore(tmp / "state")
    try:
        _, strategy_state = store.load_checkpoint(rounds)
    finally:
        store.close()
    expected = (weights[0] * c_i[0] + weights[1] * c_i[1]) / sum(weights)
    np.testing.assert_allclose(strategy_state["control"], expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("secure", ["none", "secagg"])
def test_c_stays_the_weighted_mean_of_the_clients_c_i_across_restarts(
    secure: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """Every process is restarted between rounds 2 and 3: the coordinator resumes c from its
    checkpoint and each new client process c_i from its state file. Were either lost (started
    again from 0), round 3 would break the invariant (c ≠ Σ w_i c_i / Σ w_i). Under --secure
    secagg the coordinator sees only the masked sum of [Δy, Δc], which is all SCAFFOLD needs
    (fixed point: 2^-25 per coordinate per round, docs/algorithms.md)."""
    first = run_rounds(tmp_path, procs, 2, secure)
    check_c_is_the_weighted_mean_of_c_i(tmp_path, 2)
    second = run_rounds(tmp_path, procs, 3, secure)
    check_c_is_the_weighted_mean_of_c_i(tmp_path, 3)
    assert "resuming from" in second.log()
    for i in range(CLIENTS):
        log = (tmp_path / "logs" / f"client-{i}-3.log").read_text()
        assert "resumed this client's control variate" in log
    assert "Traceback" not in first.log() + second.log()


def test_scaffold_under_homomorphic_aggregation(tmp_path: Path, procs: list[Proc]) -> None:
    """--secure he: the coordinator adds ciphertexts of [Δy, Δc] and a client decrypts the sum;
    c still ends as the clients' weighted mean (CKKS: 1e-5 absolute, docs/encryption.md)."""
    pytest.importorskip("tenseal")
    from fedcore.he import generate_keys

    secret, public = generate_keys(tmp_path / "clients")
    public = public.rename(tmp_path / public.name)  # the coordinator's, apart from the secret
    server = run_rounds(
        tmp_path, procs, 2, "he", ("--he-public-key", str(public)), ("--he-key", str(secret))
    )
    check_c_is_the_weighted_mean_of_c_i(tmp_path, 2, atol=1e-5)
    assert "Traceback" not in server.log()


def test_a_client_without_a_state_dir_is_told_to_pass_one(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    start_serving(procs, logs, port, state, "--strategy", "scaffold", "--min-clients", "1")
    client = start_client(logs, port, "0/1")
    procs.append(client)
    assert client.wait(120) == 1
    assert "pass --state-dir DIR" in client.log()
    assert "Traceback" not in client.log()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp-clip", "1.0"], "cannot be combined with DP (--dp-clip, --dp-adaptive-clip)"),
        (["--mode", "async", "--buffer-size", "2"], "cannot be combined with --mode async"),
        (["--mode", "fedsgd"], "cannot be combined with --mode fedsgd"),
        (["--train-tensors", "0.*"], "cannot be combined with --train-tensors"),
    ],
)
@pytest.mark.parametrize("command", ["run", "simulate"])
def test_unsound_combinations_are_refused_at_start_up(
    command: str, flags: list[str], message: str, tmp_path: Path
) -> None:
    """Refused alike by `fedserver run` and `fedserver simulate` (build_coordinator's checks)."""
    where = ("--port", str(free_port())) if command == "run" else ("--clients", "2")
    out = fedserver(
        command, *where, "--task", "examples.digits:task", "--strategy", "scaffold",
        "--state-dir", str(tmp_path / "state"), *flags,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "state" / "state.db").exists()


SIM = ("--clients-per-round", str(CLIENTS), "--min-clients", str(CLIENTS), "--seed", "0")


def simulate(state: Path, rounds: int, *flags: str) -> None:
    out = fedserver(
        "simulate", "--task", "examples.digits:task", "--strategy", "scaffold",
        "--clients", str(CLIENTS), "--rounds", str(rounds), "--state-dir", str(state),
        "--workers", "0", *SIM, *flags,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr


def virtual_c_i(state: Path, i: int) -> np.ndarray:
    """Virtual client i's c_i, in the simulation's StateStore, tagged as a fedclient's is."""
    flat, meta = read_safetensors(state / "virtual-clients" / f"client-{i}.{STATE_FILE}")
    assert meta == {
        "federation_id": status_json(state)["federation_id"],
        "client_id": f"client-{i}",
    }
    return float_vector(flat)


def test_simulated_scaffold_matches_fedclient_processes(tmp_path: Path, procs: list[Proc]) -> None:
    """The same federation (CLIENTS clients, every one in each of 3 rounds, same seed) with
    `fedclient` processes keeping c_i in their --state-dir and with virtual clients keeping it
    in the simulation's StateStore: the same c_i per client and the same model, within float
    tolerance (a deployment folds updates in arrival order). Simulate once refused SCAFFOLD."""
    sim = tmp_path / "sim"
    simulate(sim, ROUNDS)
    port = free_port()
    server = start_serving(
        procs, tmp_path / "logs", port, tmp_path / "real", "--strategy", "scaffold",
        "--rounds", str(ROUNDS), *SIM,
    )  # fmt: skip
    clients = [
        start_client(
            tmp_path / "logs", port, f"{i}/{CLIENTS}", "--state-dir", str(tmp_path / f"c{i}")
        )
        for i in range(CLIENTS)
    ]
    procs.extend(clients)
    wait_finished(server, clients, 240)

    real_model = load_file(tmp_path / "real" / "model.safetensors")
    sim_model = load_file(sim / "model.safetensors")
    assert sorted(sim_model) == sorted(real_model)
    for name in sim_model:
        np.testing.assert_allclose(sim_model[name], real_model[name], rtol=1e-4, atol=1e-6)
    for i in range(CLIENTS):
        real_c_i = float_vector(read_safetensors(tmp_path / f"c{i}" / STATE_FILE)[0])
        assert np.abs(real_c_i).max() > 0
        np.testing.assert_allclose(virtual_c_i(sim, i), real_c_i, rtol=1e-4, atol=1e-6)
    # Each c_i⁺ took its c_i's place once its update counted: nothing is left pending.
    assert sorted(p.name for p in (sim / "virtual-clients").iterdir()) == [
        f"client-{i}.{STATE_FILE}" for i in range(CLIENTS)
    ]


def test_a_resumed_simulation_resumes_every_c_i_on_any_worker_count(tmp_path: Path) -> None:
    """Rounds 1-2 in this process (--workers 0), then round 3 resumed on one worker process:
    the model bytes of 3 rounds straight, on 0 or 1 worker. Were c_i lost between the runs
    (started again from 0, as with the store removed), round 3 would end elsewhere."""
    models = {}
    for name, workers in (("straight-0", "0"), ("straight-1", "1")):
        simulate(tmp_path / name, ROUNDS, "--workers", workers)
        models[name] = (tmp_path / name / "model.safetensors").read_bytes()
    for name in ("resumed", "c_i-lost"):
        simulate(tmp_path / name, ROUNDS - 1)
        if name == "c_i-lost":
            shutil.rmtree(tmp_path / name / "virtual-clients")
        simulate(tmp_path / name, ROUNDS, "--workers", "1")
        models[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert models["straight-0"] == models["straight-1"] == models["resumed"]
    assert models["c_i-lost"] != models["resumed"]


def test_a_straggler_past_the_close_keeps_its_c_i(tmp_path: Path) -> None:
    """On a fleet with --overselect 2, 8 of 20 devices train each round and the round closes on
    the first 4 arrivals: the other 4 updates are never counted, so their c_i⁺ is dropped (as a
    deployed client keeps c_i when its late update is refused), and nothing is left pending."""
    state = tmp_path / "fleet"
    out = fedserver(
        "simulate", "--task", "examples.digits:task", "--strategy", "scaffold",
        "--clients", "20", "--clients-per-round", "4", "--min-clients", "4", "--overselect", "2",
        "--round-timeout", "200", "--rounds", "3", "--seed", "0", "--workers", "0",
        "--fleet", "tiers=1:4:16,speed=1", "--state-dir", str(state),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stderr.count("8 client(s) selected") == 3
    assert out.stderr.count("closed: 4 update(s)") == 3
    names = [p.name for p in (state / "virtual-clients").iterdir()]
    assert names and all(n.endswith(STATE_FILE) for n in names), names
    assert len(names) < 3 * 8  # fewer clients keep a c_i than trained


def test_c_comes_with_the_model_and_an_update_without_delta_c_is_refused(tmp_path: Path) -> None:
    """Over the wire, by hand: a selected client gets c (zeros in round 1) after the model; an
    update of the model's floats alone (an older client, or one leaving tensors out) is
    refused INVALID_ARGUMENT and counts nothing; [Δy, Δc] is counted."""
    import grpc

    from fedclient.download import read_model_stream
    from fedcore.checksums import new_hasher
    from fedcore.proto import coordinator_pb2 as pb
    from fedcore.scaffold import control_manifest, exchanged
    from fedcore.wire import manifest_to_proto
    from tests.raw_client import lone_client, update_header

    def submit(stub: object, header: pb.UpdateHeader, payload: bytes) -> pb.SubmitReply:
        hasher = new_hasher("blake3")
        hasher.update(payload)
        header.checksum = "blake3"
        chunks = [
            pb.UpdateChunk(header=header),
            pb.UpdateChunk(data=payload),
            pb.UpdateChunk(trailer=pb.UpdateTrailer(digest=hasher.hexdigest())),
        ]
        return stub.SubmitUpdate(iter(chunks), timeout=30)  # type: ignore[attr-defined,no-any-return]

    with lone_client(tmp_path, "raw", "--strategy", "scaffold", "--rounds", "2") as joined:
        request = pb.GetGlobalModelRequest(client_id="raw", wait_seconds=5)
        pulled = read_model_stream(joined.stub.GetGlobalModel(request, timeout=30))
        floats = joined.model.manifest.floats()
        assert pulled.header.config.extra["scaffold"] == "1"
        assert pulled.strategy_tensors is not None
        assert pulled.strategy_tensors.manifest == control_manifest(floats)
        assert not pulled.strategy_tensors.buffer.any()  # c = 0 before the first round
        d = sum(t.numel for t in floats.tensors)
        only_y = np.full(d, 0.01, dtype="<f4").tobytes()
        with pytest.raises(grpc.RpcError) as refused:
            submit(joined.stub, update_header("raw", 1, joined.model, len(only_y)), only_y)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "strategy scaffold" in refused.value.details()
        both = np.full(2 * d, 0.01, dtype="<f4").tobytes()
        manifest = manifest_to_proto(exchanged(floats))
        header = update_header("raw", 1, joined.model, len(both), manifest=manifest)
        assert submit(joined.stub, header, both).accepted
