"""examples/resnet_digits.py: a ResNet-18 of realistic size on the bundled digits, as images."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.cnn import PARTIAL
from examples.digits import task as digits
from examples.resnet_digits import ResNetDigitsTask, task
from fedclient.partition import Partition
from fedclient.task import TrainConfig
from fedcore.device import configure
from fedcore.selection import Selection
from fedserver.state.history import read_status
from tests.procs import Proc, free_port, run_module, start_clients, start_serving, wait_finished


def test_the_default_model_is_a_resnet18_of_over_ten_million_parameters() -> None:
    flat = task.initial_model(0)
    floats = flat.manifest.floats()
    assert floats.total_bytes // 4 == 11_172_810
    assert flat.manifest == task.initial_model(0).manifest
    assert flat.version == task.initial_model(0).version  # peers agree on round 0
    # GroupNorm: every state tensor is a trained float (no BatchNorm running statistics).
    assert len(floats.tensors) == len(flat.manifest.tensors)
    # bench.cnn's partial setting leaves out the last stage: about a quarter of the model.
    chosen = Selection.matching(floats, PARTIAL).indices
    share = sum(floats.tensors[i].nbytes for i in chosen) / floats.total_bytes
    assert 0.2 < share < 0.3


def test_images_come_from_the_digits_split_upscaled() -> None:
    small = ResNetDigitsTask(max_train=50)
    data = small.load_partition(Partition(1, 3))
    x, y = data.train.tensors  # type: ignore[attr-defined]
    assert x.shape == (50, 1, 12, 12) and x.dtype == torch.float32 and y.shape == (50,)
    test_x, test_y = small.server_test_data().tensors
    _, ref_y = digits.server_test_data().tensors
    assert test_x.shape == (len(ref_y), 1, 12, 12) and torch.equal(test_y, ref_y)
    plain = ResNetDigitsTask(side=8).server_test_data().tensors[0]
    assert torch.equal(plain.reshape(len(ref_y), 64), digits.server_test_data().tensors[0])
    with pytest.raises(ValueError, match="multiples of 16"):
        ResNetDigitsTask(widths=(40,))
    with pytest.raises(ValueError, match="side must be >= 8"):
        ResNetDigitsTask(side=4)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """As a client with --threads 1 (tests/procs.py): on 2 busy cores, torch's default of one
    thread per core made this test 10x slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_narrow_resnet_learns_a_small_slice_deterministically() -> None:
    """Local training through the Task's default loop: loss falls, accuracy well above 0.1.
    Narrow and at 8x8 to keep it to seconds; the same code as the full model's."""
    narrow = ResNetDigitsTask(side=8, widths=(16, 32, 32, 64), max_train=96)
    data = narrow.load_partition(Partition(0, 3))

    def run() -> tuple[list[float], dict[str, float], torch.Tensor]:
        torch.manual_seed(0)
        model = narrow.build_model()
        losses = [narrow.evaluate(model, data.train)["loss"]]
        for epoch in range(6):
            config = TrainConfig(local_epochs=1, lr=0.05, batch_size=16, seed=epoch)
            narrow.train(model, data.train, config)
            losses.append(narrow.evaluate(model, data.train)["loss"])
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        return losses, narrow.evaluate(model, data.train), weights

    losses, scores, weights = run()
    assert losses[-1] < 0.7 * losses[0], losses
    assert scores["accuracy"] >= 0.4, scores  # chance is 0.1
    again = run()
    assert again[0] == losses and torch.equal(again[2], weights)  # same seeds, same bytes


@pytest.mark.usefixtures("one_thread")
def test_the_resnet_trains_under_the_placement_it_is_given() -> None:
    """--device/--precision reach the model through the Task's default loops: bf16 autocast
    on the CPU here (a GPU machine runs the same code on cuda)."""
    narrow = ResNetDigitsTask(side=8, widths=(16, 32, 32, 64), max_train=32)
    configure(narrow, "cpu", "bf16")
    data = narrow.load_partition(Partition(0, 3))
    torch.manual_seed(0)
    model = narrow.build_model()
    result = narrow.train(model, data.train, TrainConfig(lr=0.05, batch_size=16))
    assert result.num_examples == 32 and math.isfinite(result.metrics["train_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast
    assert next(model.parameters()).device == narrow.device == torch.device("cpu")


@pytest.mark.integration
@pytest.mark.slow  # ~80 s on 2 busy cores: a round of an 11 M-parameter model on 2 clients
@pytest.mark.timeout(900)
def test_one_round_of_the_full_resnet_through_real_processes(
    tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    flags = ("--rounds", "1", "--min-clients", "2", "--round-timeout", "600", "--device", "cpu")
    server = start_serving(procs, logs, port, state, *flags, task="examples.resnet_digits:task")
    clients = start_clients(
        procs, logs, port, 2, "--encoding", "int8", task="examples.resnet_digits:task"
    )
    wait_finished(server, clients, 800)
    status = read_status(state)
    assert status["rounds_completed"] == 1
    (first,) = status["rounds"]
    assert first["participants"] == 2
    # int8 updates of 11.2 M parameters: about a quarter of fp32's 44.7 MB each.
    assert first["bytes_in"] == 2 * 11_347_386
    assert first["metrics"]["accuracy"] > 0.2  # one epoch from scratch: well above chance


# A narrow ResNet with the full one's tensor names, for bench.cnn's smoke run below.
tiny = ResNetDigitsTask(side=8, widths=(16, 16, 32, 64), max_train=64)


@pytest.mark.integration
@pytest.mark.slow  # 6 processes importing torch: ~70 s on 2 busy cores
@pytest.mark.timeout(300)
def test_bench_cnn_writes_a_table_and_json(tmp_path: Path) -> None:
    flags = ("--task", "tests.test_resnet_task:tiny", "--settings", "int8", "partial")
    out = run_module(
        "bench.cnn", *flags, "--rounds", "1", "--clients", "2", "--out", str(tmp_path), timeout=280
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bytes/update" in out.stdout and "partial" in out.stdout
    (result,) = tmp_path.glob("cnn-*.json")
    data = json.loads(result.read_text())
    assert (data["clients"], data["rounds"]) == (2, 1)
    int8, partial = data["rows"]
    assert (int8["setting"], partial["setting"]) == ("int8", "partial")
    assert partial["train_tensors"] == PARTIAL and partial["encoding"] == "fp32"
    for row in (int8, partial):
        assert row["rounds"] == 1 and row["round_seconds"] > 0
        assert 0 <= row["accuracy"] <= 1 and row["coordinator_peak_rss"] > 0
        # What the coordinator counted is what the encoding (and the selection) promise.
        assert row["update_bytes_received"] == row["update_bytes_payload"]
    assert 0.2 < int8["vs_fp32"] < 0.3 and partial["vs_fp32"] < 0.5
