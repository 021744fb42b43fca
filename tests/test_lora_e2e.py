"""LoRA federations with real processes: only adapter bytes on the wire, a client with another
frozen base refused at Join, and the stdlib example's perplexity falling (docs/llm.md)."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
from safetensors.numpy import load_file

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedserver.state.history import read_status
from tests.lora_task import other_base
from tests.lora_task import task as tiny_lora
from tests.procs import Proc, free_port, start_client, start_clients, start_serving, wait_finished
from tests.test_simulation import _simulate, ray_dir  # noqa: F401 (a fixture)

pytest.importorskip("peft")  # the llm extra
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

TASK = "tests.lora_task:task"


def _join(port: int, **fields: object) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(**fields), timeout=30)  # type: ignore[arg-type]
    return e.value


def test_only_adapters_travel_and_another_base_is_refused(
    tmp_path: Path, procs: list[Proc]
) -> None:
    rounds, port = 2, free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    args = ("--rounds", str(rounds), "--min-clients", "2")
    server = start_serving(procs, logs, port, state, *args, task=TASK)

    adapters = tiny_lora.initial_model(0)
    fingerprint = adapters.manifest.fingerprint  # same adapter shapes as other_base's
    assert other_base.initial_model(0).manifest.fingerprint == fingerprint
    e = _join(
        port,
        client_id="raw",
        model_fingerprint=fingerprint,
        properties={"base_model": other_base.base_fingerprint()},
    )
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    ours = tiny_lora.base_fingerprint()
    assert (
        f"client 'raw' fine-tunes a different frozen base model: its base hash is "
        f"{other_base.base_fingerprint()[:12]}, this coordinator's is {ours[:12]} (task {TASK}): "
        "give the client the same base checkpoint files and LoraSpec"
    ) in e.details()
    e = _join(port, client_id="raw", model_fingerprint=fingerprint)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "its base hash is (not sent)" in e.details()

    stranger = start_client(
        logs,
        port,
        "1/2",
        "--give-up-after",
        "30",
        task="tests.lora_task:other_base",
        name="stranger",
    )
    procs.append(stranger)
    assert stranger.wait(120) != 0
    assert "fine-tunes a different frozen base model" in stranger.log()

    clients = start_clients(procs, logs, port, 2, task=TASK)
    wait_finished(server, clients, 300)
    status = read_status(state)
    size = adapters.buffer.size  # 4 * (2*32 + 96*2) = 1,024 bytes
    assert [r["bytes_in"] for r in status["rounds"]] == [2 * size] * rounds
    assert [r["bytes_out"] for r in status["rounds"]] == [2 * size] * rounds
    checkpoint = load_file(state / "checkpoints" / f"round-{rounds:04d}.safetensors")
    assert sorted(checkpoint) == [t.name for t in adapters.manifest.tensors]
    assert server.log().count("Join refused (FAILED_PRECONDITION)") == 3
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_stdlib_example_federation_lowers_held_out_perplexity(
    tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.stdlib_lm import tiny

    env = {"FEDGRPC_LLM_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("FEDGRPC_LLM_CACHE", env["FEDGRPC_LLM_CACHE"])
    model = tiny.build_model()  # pre-trains the tiny base here, once, for every process
    rounds, port = 3, free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    args = ("--rounds", str(rounds), "--min-clients", "2")
    server = start_serving(procs, logs, port, state, *args, task="examples.stdlib_lm:tiny", env=env)
    clients = [
        start_client(logs, port, f"{i}/2", task="examples.stdlib_lm:tiny", env=env)
        for i in range(2)
    ]
    procs.extend(clients)
    wait_finished(server, clients, 360)

    model.load_state_dict(load_file(state / "checkpoints" / "round-0000.safetensors"))
    before = tiny.evaluate(model, tiny.server_test_data())["perplexity"]
    after = [r["metrics"]["perplexity"] for r in read_status(state)["rounds"]]
    print(f"stdlib_lm tiny: held-out perplexity {before:.3f} -> {after}")
    assert math.isfinite(after[-1]) and after[-1] < before * 0.98


@pytest.mark.slow
def test_a_lora_task_runs_in_simulate_with_adapter_only_updates(
    tmp_path: Path,
    ray_dir: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    state = tmp_path / "state"
    _simulate(state, ray_dir, TASK, "--clients", "2", "--rounds", "2", "--workers", "1")
    size = tiny_lora.initial_model(0).buffer.size
    assert [r["bytes_in"] for r in read_status(state)["rounds"]] == [2 * size] * 2
