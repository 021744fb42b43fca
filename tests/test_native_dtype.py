"""Models whose weights are bfloat16/float16 travel at their own dtype under fp32 (issue 23):
the update of a bf16-native model is 2 bytes per value on the wire, not an fp32 upcast."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclient.local_update import local_update
from fedclient.partition import Partition
from fedclient.task import TrainConfig
from fedcore.codecs import Float32Codec, get_codec
from fedcore.selection import Selection
from fedcore.tensors import (
    Manifest,
    ManifestError,
    TensorSpec,
    flatten_arrays,
    flatten_state_dict,
    float_vector,
)
from fedserver.state.history import read_status
from fedserver.strategies.base import add_to_floats
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.receiver import UpdateReceiver
from tests.bf16_task import Bf16Task
from tests.procs import Proc, free_port, start_clients, start_serving, wait_finished

MIXED = Manifest(
    (
        TensorSpec("a", "bfloat16", (5, 3)),
        TensorSpec("b", "bfloat16", (3,)),
        TensorSpec("c", "float32", (7,)),
        TensorSpec("d", "float16", (4,)),
        TensorSpec("e", "float64", (2,)),
    )
)
N = 31


def test_fp32_keeps_half_precision_tensors_at_their_dtype() -> None:
    wire = get_codec("fp32").wire_manifest(MIXED)
    assert [t.dtype for t in wire.tensors] == [
        "bfloat16",
        "bfloat16",
        "float32",
        "float16",
        "float32",
    ]
    assert wire.total_bytes == 18 * 2 + 7 * 4 + 4 * 2 + 2 * 4
    plain = Manifest((TensorSpec("w", "float32", (3,)), TensorSpec("x", "float64", (2,))))
    assert get_codec("fp32").bind(plain) is get_codec("fp32")  # fp32 models: as before


@pytest.mark.parametrize("step", [1, 3, 7, 37, 1000])
def test_bound_fp32_streams_each_run_at_its_dtype(step: int) -> None:
    codec = get_codec("fp32").bind(MIXED)
    # Values every dtype holds exactly, so the round trip is exact.
    x = (np.arange(N, dtype=np.float32) - 15) / 8
    payload = codec.encode(x)
    assert payload.size == codec.wire_manifest(MIXED).total_bytes == 80
    assert codec.bind(codec.wire_manifest(MIXED)).encode(x).tobytes() == payload.tobytes()
    decoder = codec.decoder(N)
    out = np.full(N, np.nan, dtype=np.float32)
    data = payload.tobytes()
    for start in range(0, len(data), step):  # odd splits cut values and runs apart
        for piece in decoder.feed(memoryview(data)[start : start + step]):
            assert piece.values.dtype == np.float32
            out[piece.offset : piece.offset + piece.values.size] = piece.values
    decoder.finish()
    np.testing.assert_array_equal(out, x)


def test_bound_fp32_refuses_truncated_and_oversized_streams() -> None:
    codec = get_codec("fp32").bind(MIXED)
    payload = codec.encode(np.ones(N, dtype=np.float32)).tobytes()
    for cut in (1, 2, 9, 40, 79):
        decoder = codec.decoder(N)
        list(decoder.feed(payload[:cut]))
        with pytest.raises(ManifestError, match="truncated"):
            decoder.finish()
    with pytest.raises(ManifestError, match="more"):
        list(codec.decoder(N).feed(payload + b"\0\0"))
    with pytest.raises(ManifestError, match="values declared"):
        codec.decoder(N + 1)


def test_bf16_model_update_is_exchanged_at_bf16(tmp_path: Path) -> None:
    """local_update -> encode -> stream into the coordinator -> fold -> apply, at bfloat16."""
    task = Bf16Task()
    torch.manual_seed(0)
    base = flatten_state_dict(task.build_model().state_dict())
    floats = base.manifest.floats()
    assert {t.dtype for t in floats.tensors} == {"bfloat16"}
    n = sum(t.numel for t in floats.tensors)
    acc = Accumulator(n)
    sent = Selection.everything(floats)
    for index, weight in ((0, 64.0), (1, 64.0)):
        model = task.build_model()
        config = TrainConfig(local_epochs=2, lr=0.1, seed=index)
        _, delta = local_update(
            task, model, task.load_partition(Partition(index, 2)), base, config, sent
        )
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert delta.dtype == np.float32 and np.abs(delta).max() > 0
        codec = get_codec("fp32").bind(sent.manifest)
        payload = codec.encode(delta)
        wire = codec.wire_manifest(sent.manifest)
        assert [t.dtype for t in wire.tensors] == ["bfloat16"] * len(floats.tensors)
        assert payload.size == 2 * n == wire.total_bytes  # half of an fp32 upcast
        # The coordinator binds from what the header declares: the same codec.
        receiving = get_codec("fp32").bind(wire)
        receiver = UpdateReceiver(receiving, n, payload.size, tmp_path)
        for start in range(0, payload.size, 13):
            receiver.add(payload[start : start + 13].tobytes())
        staged = receiver.finish(hashlib.sha256(payload).hexdigest())
        # The delta of two bf16 weights, rounded once to bf16: within bf16's half ulp.
        decoded = receiving.decode(payload, n)
        np.testing.assert_allclose(decoded, delta, rtol=2**-8, atol=0)
        acc.fold(staged, weight)
        staged.discard()
    new = add_to_floats(base, acc.mean())
    assert new.manifest == base.manifest  # still bfloat16, same bytes per value
    assert new.buffer.size == base.buffer.size
    assert not np.array_equal(float_vector(new), float_vector(base))


def test_other_codecs_are_unbound() -> None:
    for name in ("fp16", "int8", "topk"):
        codec = get_codec(name)
        assert codec.bind(MIXED) is codec
    assert isinstance(get_codec("fp32"), Float32Codec)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_bf16_model_federation_sends_bf16_updates(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    task = "tests.bf16_task:task"
    server = start_serving(
        procs, logs, port, state, "--rounds", "2", "--min-clients", "2", task=task
    )
    clients = start_clients(procs, logs, port, 2, "--device", "cpu", task=task)
    wait_finished(server, clients, 200)
    assert read_status(state)["rounds_completed"] == 2
    floats = Bf16Task().initial_model(0).manifest.floats()
    size = 2 * sum(t.numel for t in floats.tensors)
    for client in clients:
        assert f"update accepted ({size} bytes)" in client.log()
    # The published model stayed bfloat16 (safetensors header: 8-byte length, then JSON).
    raw = (state / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_a_float16_tensor_saturates_at_65504_instead_of_becoming_inf() -> None:
    # One client sending float16's largest value (65504, finite, within every bound) two rounds
    # running pushed a float16 weight past 65504: the cast made it inf, and the published model.
    model = flatten_arrays({"h": np.array([1.0, -2.0, 3.0], dtype=np.float16)})
    delta = np.array([65504.0, -65504.0, 0.5], np.float32)
    once = add_to_floats(add_to_floats(model, delta), delta)
    assert float_vector(once).tolist() == [65504.0, -65504.0, 4.0]
    honest = add_to_floats(model, np.array([0.25, 0.5, -1.0], np.float32))
    assert float_vector(honest).tolist() == [1.25, -1.5, 2.0]  # ordinary values: a plain cast
