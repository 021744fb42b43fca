"""--device and --precision: resolving them, and the Task's loops running under them (CPU here;
the CUDA paths are exercised only where a CUDA device exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.digits import DigitsTask
from fedclient.partition import Partition
from fedclient.task import TrainConfig
from fedcore.device import Placement, configure, resolve_device
from fedserver.state.history import read_status
from tests.procs import Proc, free_port, run_module, start_clients, start_serving, wait_finished

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _trained(precision: str) -> tuple[torch.nn.Module, dict[str, float], DigitsTask]:
    task = DigitsTask()
    configure(task, "cpu", precision)
    torch.manual_seed(0)
    model = task.build_model()
    data = task.load_partition(Partition(0, 3))
    result = task.train(model, data.train, TrainConfig(local_epochs=2, seed=1))
    return model, result.metrics, task


def test_auto_and_cpu_resolve_to_what_this_machine_has() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_is_refused_with_the_fix() -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError) as e:
            resolve_device(name)
        assert "CUDA is not available on this machine (torch" in str(e.value)
        assert "use --device cpu or auto" in str(e.value)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "mps:1", ""])
def test_unknown_devices_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, cuda:N or mps"):
        resolve_device(name)


def test_pinned_memory_only_for_cuda() -> None:
    # torch.device("cuda") is only a name: no CUDA is needed to build one.
    assert Placement(torch.device("cuda")).pin_memory
    assert not Placement(torch.device("cpu")).pin_memory
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, fp16"):
        Placement(torch.device("cpu"), "int8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_and_keeps_fp32_weights(precision: str) -> None:
    model, metrics, task = _trained(precision)
    reference, ref_metrics, _ = _trained("fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    # Autocast changed the arithmetic: the weights differ from the fp32 run's, a little.
    ours = torch.cat([p.detach().flatten() for p in model.parameters()])
    theirs = torch.cat([p.detach().flatten() for p in reference.parameters()])
    assert not torch.equal(ours, theirs)
    assert metrics["train_accuracy"] == pytest.approx(ref_metrics["train_accuracy"], abs=0.05)
    scores = task.evaluate(model, task.server_test_data())  # evaluated under autocast too
    ref_scores = task.evaluate(reference, task.server_test_data())
    assert scores["accuracy"] == pytest.approx(ref_scores["accuracy"], abs=0.05)
    assert scores["loss"] == pytest.approx(ref_scores["loss"], rel=0.05)


@no_cuda
def test_fedclient_run_device_cuda_without_cuda_exits_2() -> None:
    args = ["run", "--server", "127.0.0.1:1", "--task", "examples.digits:task"]
    out = run_module("fedclient.cli", *args, "--device", "cuda", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "CUDA is not available on this machine" in out.stderr
    assert "use --device cpu or auto" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_federation_trains_at_bf16_on_cpu(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    # The coordinator evaluates on `auto` (this machine's CUDA device where it has one).
    flags = ("--rounds", "3", "--min-clients", "2", "--device", "auto")
    server = start_serving(procs, logs, port, state, *flags)
    clients = start_clients(procs, logs, port, 2, "--device", "cpu", "--precision", "bf16")
    wait_finished(server, clients, 200)
    status = read_status(state)
    assert status["rounds_completed"] == 3
    assert all(r["participants"] == 2 for r in status["rounds"])
    assert status["rounds"][-1]["metrics"]["accuracy"] >= 0.85
    assert all("training on cpu (bf16)" in c.log() for c in clients)  # said at start


def test_device_and_precision_come_from_the_environment_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedclient.cli import build_parser
    from fedcore.config import parse_layered

    monkeypatch.setenv("FEDGRPC_DEVICE", "cpu")
    monkeypatch.setenv("FEDGRPC_PRECISION", "bf16")
    argv = ["run", "--server", "h:1", "--task", "examples.digits:task"]
    args = parse_layered(build_parser(), argv, "client")
    assert (args.device, args.precision) == ("cpu", "bf16")


def test_simulate_gives_virtual_clients_the_device_its_resources_grant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedclient.virtual import VirtualClients, VirtualSpec
    from fedserver.cli import build_parser
    from fedserver.simulation.cli import sim_settings

    def settings(*flags: str) -> tuple[str, str]:
        base = ["simulate", "--task", "examples.digits:task", "--state-dir", str(tmp_path)]
        s = sim_settings(build_parser().parse_args([*base, "--clients", "2", *flags]))
        return s.device, s.precision

    assert settings() == ("cpu", "fp32")  # auto with gpus=0: the CPU, whatever the host has
    assert settings("--client-resources", "cpus=1,gpus=0.5") == ("auto", "fp32")
    no_gpu = "gpus=0.5, but --device auto finds no GPU on this machine: the virtual clients train"
    assert (no_gpu in caplog.text) == (resolve_device("auto").type == "cpu")
    assert settings("--precision", "bf16") == ("cpu", "bf16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            settings("--device", "cuda")
    # On a cluster the workers' devices are theirs to check.
    assert settings("--device", "cuda:1", "--ray-address", "auto") == ("cuda:1", "fp32")
    clients = VirtualClients(VirtualSpec("examples.digits:task", 2, precision="bf16"))
    try:
        assert clients.task.placement == Placement(torch.device("cpu"), "bf16")
    finally:  # the module-level task is shared with the other tests of this process
        configure(clients.task, "cpu", "fp32")


def test_fedserver_run_device_sets_where_the_held_out_evaluation_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedcore.config import parse_layered
    from fedserver.cli import build_parser
    from fedserver.commands.run import server_settings
    from fedserver.coordinator.central_eval import Evaluator, placement_for

    argv = ["run", "--task", "examples.digits:task"]
    assert server_settings(parse_layered(build_parser(), argv, "server")).device == "cpu"
    monkeypatch.setenv("FEDGRPC_DEVICE", "auto")
    assert server_settings(parse_layered(build_parser(), argv, "server")).device == "auto"
    assert placement_for("cpu") is None  # the task's own (CPU) placement, no torch needed
    assert placement_for("auto") == Placement(resolve_device("auto"))
    task = DigitsTask()
    evaluator = Evaluator(task, placement_for("auto"))
    assert task.placement == Placement(resolve_device("auto"))
    scores = evaluator(task.initial_model(0))
    assert set(scores) == {"loss", "accuracy"} and 0 <= scores["accuracy"] <= 1


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_fedserver_run_device_cuda_without_cuda_exits_2(tmp_path: Path, device: str) -> None:
    state = tmp_path / "state"
    out = run_module(
        "fedserver.cli",
        *("run", "--task", "examples.digits:task", "--state-dir", str(state)),
        *("--port", str(free_port()), "--device", device),
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert f"--device {device}: CUDA is not available on this machine" in out.stderr
    assert "use --device cpu or auto" in out.stderr
    assert "Traceback" not in out.stderr
    assert not state.exists()  # refused before the state dir was made


def test_simulate_keeps_device_for_its_clients_and_evaluates_on_the_cpu(tmp_path: Path) -> None:
    from fedserver.cli import build_parser
    from fedserver.simulation.cli import sim_settings

    base = ["simulate", "--task", "examples.digits:task", "--state-dir", str(tmp_path)]
    args = build_parser().parse_args([*base, "--clients", "2", "--client-resources", "gpus=1"])
    s = sim_settings(args)
    assert (s.device, s.server.device) == ("auto", "cpu")
