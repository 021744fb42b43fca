"""LoRA tasks (fedclient/lora.py): adapter-only state, FedIT and FFA-LoRA aggregation against
a hand-computed reference, and the frozen-base hash that Join compares."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclient.local_update import local_update
from fedclient.partition import Partition
from fedcore.codecs import get_codec
from fedcore.selection import Selection
from fedcore.tensors import FlatModel, flatten_state_dict, float_vector, iter_chunks
from fedserver.updates.accumulator import Accumulator
from fedserver.updates.receiver import UpdateReceiver
from tests.lora_task import TinyLora

pytest.importorskip("peft")  # the llm extra

FP32 = get_codec("fp32")


def _names(model: FlatModel) -> list[str]:
    return [t.name for t in model.manifest.tensors]


def test_the_state_is_the_adapters_only() -> None:
    fedit = TinyLora().initial_model(0)
    assert _names(fedit) == [
        "transformer.h.0.attn.c_attn.lora_A.weight",
        "transformer.h.0.attn.c_attn.lora_B.weight",
    ]
    assert [t.shape for t in fedit.manifest.tensors] == [(2, 32), (96, 2)]
    assert _names(TinyLora(scheme="ffa").initial_model(0)) == [
        "transformer.h.0.attn.c_attn.lora_B.weight"  # A is frozen and never sent
    ]
    base = TinyLora().build_model().lm
    full = sum(4 * p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    assert fedit.buffer.size == 4 * (2 * 32 + 96 * 2) < 0.02 * full


def test_ffa_draws_a_from_its_seed_alone_and_never_trains_it() -> None:
    task = TinyLora(scheme="ffa")
    torch.manual_seed(1)
    one = task.build_model()
    torch.manual_seed(2)  # another global RNG state: the same A
    two = task.build_model()
    name = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    a_one, a_two = (dict(m.lm.named_parameters())[name] for m in (one, two))
    assert torch.equal(a_one, a_two) and not a_one.requires_grad
    assert a_one.abs().max() <= 1 / 32**0.5  # peft's default range, U(-1/sqrt(in), 1/sqrt(in))
    before = a_one.detach().clone()
    data = task.load_partition(Partition(0, 2))
    base = task.initial_model(0)
    _, delta = local_update(task, one, data, base, task.default_config(), _all(base))
    assert torch.equal(a_one, before)
    assert np.abs(delta).max() > 0  # B moved


def _all(model: FlatModel) -> Selection:
    return Selection.matching(model.manifest.floats(), "*")


def _fedavg(tmp_path: Path, base: FlatModel, deltas: list[np.ndarray], weights: list[int]):  # type: ignore[no-untyped-def]
    """The coordinator's path: each fp32 update streamed through UpdateReceiver, folded into
    the example-weighted Accumulator; FedAvg adds the mean delta (server lr 1)."""
    sizes = [t.numel for t in base.manifest.floats().tensors]
    acc = Accumulator(sum(sizes), sizes)
    for i, (delta, weight) in enumerate(zip(deltas, weights, strict=True)):
        payload = FP32.encode(delta.astype(np.float32)).tobytes()
        receiver = UpdateReceiver(FP32, delta.size, len(payload), tmp_path / f"spill{i}")
        for chunk in iter_chunks(payload, 4096):
            receiver.add(bytes(chunk))
        acc.fold(receiver.finish(hashlib.sha256(payload).hexdigest()), float(weight))
    return float_vector(base) + acc.mean()


def _train_two(task: TinyLora) -> tuple[FlatModel, list[dict[str, torch.Tensor]], list[int], list]:  # type: ignore[type-arg]
    base = task.initial_model(0)
    states, weights, deltas = [], [], []
    for index in range(2):
        model = task.build_model()
        data = task.load_partition(Partition(index, 2))
        config = task.default_config()
        result, delta = local_update(task, model, data, base, config, _all(base))
        states.append(model.state_dict())
        weights.append(result.num_examples)
        deltas.append(delta)
    return base, states, weights, deltas


def _split(vector: np.ndarray, base: FlatModel) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for spec in base.manifest.tensors:
        out[spec.name] = torch.from_numpy(vector[pos : pos + spec.numel].reshape(spec.shape))
        pos += spec.numel
    return out


A = "transformer.h.0.attn.c_attn.lora_A.weight"
B = "transformer.h.0.attn.c_attn.lora_B.weight"


def test_fedit_averages_a_and_b_separately_which_is_not_the_mean_product(
    tmp_path: Path,
) -> None:
    task = TinyLora()
    base, states, weights, deltas = _train_two(task)
    got = _split(_fedavg(tmp_path, base, deltas, weights), base)
    w = [n / sum(weights) for n in weights]
    ref_a = w[0] * states[0][A] + w[1] * states[1][A]  # by hand: FedIT's definition
    ref_b = w[0] * states[0][B] + w[1] * states[1][B]
    torch.testing.assert_close(got[A], ref_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[B], ref_b, rtol=0, atol=1e-6)
    mean_product = w[0] * states[0][B] @ states[0][A] + w[1] * states[1][B] @ states[1][A]
    gap = (got[B] @ got[A] - mean_product).abs().max().item()
    assert gap > 1e-4, "FedIT's product of means differs from the mean of products"


def test_ffa_average_of_b_is_the_exact_mean_of_the_products(tmp_path: Path) -> None:
    task = TinyLora(scheme="ffa")
    base, states, weights, deltas = _train_two(task)
    got = _split(_fedavg(tmp_path, base, deltas, weights), base)
    a = dict(task.build_model().lm.named_parameters())[
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    ].detach()
    w = [n / sum(weights) for n in weights]
    ref_b = w[0] * states[0][B] + w[1] * states[1][B]
    torch.testing.assert_close(got[B], ref_b, rtol=0, atol=1e-6)
    mean_product = w[0] * states[0][B] @ a + w[1] * states[1][B] @ a
    torch.testing.assert_close(got[B] @ a, mean_product, rtol=0, atol=1e-6)


def test_the_base_hash_covers_the_base_weights_and_the_lora_settings(tmp_path: Path) -> None:
    one = TinyLora().base_fingerprint()
    assert one == TinyLora().base_fingerprint()
    assert one != TinyLora(base_seed=1).base_fingerprint()  # another base
    assert one != TinyLora(scheme="ffa").base_fingerprint()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"one")
    local = TinyLora()
    local.base_checkpoint = lambda: tmp_path / "ckpt"  # type: ignore[method-assign]
    first = local.base_fingerprint()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"two")
    assert local.base_fingerprint() != first  # another checkpoint's bytes


def test_adapter_model_loads_its_state_and_refuses_another() -> None:
    task = TinyLora()
    model = task.build_model()
    state = flatten_state_dict(model.state_dict())
    other = task.build_model()
    other.load_state_dict(model.state_dict())
    assert float_vector(flatten_state_dict(other.state_dict())).tolist() == (
        float_vector(state).tolist()
    )
    with pytest.raises(RuntimeError, match="adapter state does not match"):
        other.load_state_dict({"transformer.wte.weight": torch.zeros(1)})
