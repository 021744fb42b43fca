"""What a client computes locally around training: which parameters train, the gradient
vector (FedSGD), client-level DP, the per-round training seed, and the local update itself
(`local_update`, shared by `fedclient` sessions and simulated clients). Pure torch/numpy, no
gRPC."""

from __future__ import annotations

import contextlib
import hashlib
import random
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fedclient.model_memory import BoundModel
from fedclient.task import LocalData, Task, TrainConfig, TrainResult
from fedcore.privacy import CLIP_BIT_METRIC, add_gaussian_noise, l2_clip, with_masked_bit
from fedcore.selection import Selection
from fedcore.tensors import FlatModel, Manifest, to_state_dict


@contextlib.contextmanager
def trainable_only(model: Any, selection: Selection) -> Iterator[None]:
    """Freeze the parameters outside `selection` while the block runs (partial updates)."""
    keep = set(selection.names)
    frozen = [
        p
        for name, p in model.named_parameters(remove_duplicate=False)
        if name not in keep and p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def gradient_vector(model: Any, floats: Manifest) -> np.ndarray:
    """Parameters' `.grad` as one float32 vector in manifest order; 0 for buffers (BN stats)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = np.zeros(sum(t.numel for t in floats.tensors), dtype=np.float32)
    pos = 0
    for spec in floats.tensors:
        param = params.get(spec.name)
        if param is not None and param.grad is not None:
            out[pos : pos + spec.numel] = param.grad.detach().reshape(-1).float().cpu().numpy()
        pos += spec.numel
    return out


def privatize(delta: np.ndarray, extra: dict[str, str]) -> np.ndarray:
    """Client-level DP, the one place it happens: clip to the round's C, add this client's
    share of the noise when the coordinator cannot (secure aggregation). See fedcore/privacy.py."""
    if "dp_clip" in extra:
        delta = l2_clip(delta, float(extra["dp_clip"]))
    std = float(extra.get("dp_client_noise_std", 0.0))
    if std > 0:
        # Never seeded: a predictable noise draw would let the noise be subtracted again.
        delta = add_gaussian_noise(delta, std, np.random.default_rng(secrets.randbits(128)))
    return delta


def clip_bit(delta: np.ndarray, extra: dict[str, str]) -> float | None:
    """Adaptive clipping, client side (--dp-adaptive-clip client): 1.0 if this update's norm
    is within the round's clip before `privatize` clips it, else 0.0; None when the round does
    not ask. See `report_clip_bit` for how it travels."""
    if extra.get("dp_report_clip_bit") not in ("1", "masked") or "dp_clip" not in extra:
        return None
    norm = float(np.linalg.norm(np.asarray(delta, dtype=np.float64)))
    return 1.0 if norm <= float(extra["dp_clip"]) else 0.0


def report_clip_bit(
    bit: float | None, delta: np.ndarray, manifest: Manifest, extra: dict[str, str]
) -> tuple[np.ndarray, Manifest, dict[str, float]]:
    """Where the clip bit goes: as the metric CLIP_BIT_METRIC (the coordinator sees updates in
    plain and noises the count), or under secagg/he ("masked") as the privatized
    update's last value, plus this client's share of the count noise, so the coordinator only
    unmasks the noised sum. Returns (update, its manifest, metrics to add)."""
    if bit is None:
        return delta, manifest, {}
    if extra["dp_report_clip_bit"] != "masked":
        return delta, manifest, {CLIP_BIT_METRIC: bit}
    std = float(extra.get("dp_client_count_noise_std", 0.0))
    value = np.array([bit], dtype=np.float32)
    if std > 0:
        # Never seeded, like privatize's noise: a predictable draw could be subtracted again.
        value = add_gaussian_noise(value, std, np.random.default_rng(secrets.randbits(128)))
    vector = np.concatenate([np.asarray(delta, dtype=np.float32), value])
    return vector, with_masked_bit(manifest), {}


def round_seed(seed: int, client_id: str, round_number: int) -> int:
    digest = hashlib.sha256(f"{seed}:{client_id}:{round_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_rngs(seed: int) -> None:
    """Seed every global generator a Task may draw from: torch's, numpy's and `random`'s.

    Called before each local update with the (seed, client, round) seed: a simulation worker
    trains many clients one after another, so a generator left unseeded would carry one
    client's draws into the next and make the model depend on the number of workers.
    (A Task's own `np.random.default_rng()` without a seed stays unseeded: seed it from
    `config.seed`.)
    """
    import torch

    # torch.manual_seed would also queue a lazy seed for every accelerator backend not yet
    # initialized, recording a formatted stack trace each time (~2 ms per call, most of a small
    # virtual client's update): seed only the generators that exist.
    torch.random.default_generator.manual_seed(seed)
    for backend in (torch.cuda, getattr(torch, "xpu", None)):
        if backend is not None and backend.is_available():
            backend.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
    np.random.seed(seed)  # the legacy global state: what `np.random.normal()` etc. draw from
    random.seed(seed)


# Round-config key and metric name: the loss of the received model on this client's training
# data, before training (q-FedAvg's F_k(w^t); fedserver/strategies/qfedavg.py).
LOSS_BEFORE_TRAINING = "loss_before_training"


def loss_before_training(
    task: Task, model: Any, data: LocalData, config: TrainConfig
) -> dict[str, float]:
    """{LOSS_BEFORE_TRAINING: loss} when the round asks for it (one evaluation pass over the
    training data), else {}."""
    if config.extra.get(LOSS_BEFORE_TRAINING) != "1":
        return {}
    metrics = task.evaluate(model, data.train)
    if "loss" not in metrics:
        raise ValueError(
            "this round's strategy needs the loss of the received model on the training data, "
            "but the task's evaluate() reports no 'loss'"
        )
    return {LOSS_BEFORE_TRAINING: float(metrics["loss"])}


def local_update(
    task: Task,
    model: Any,
    data: LocalData,
    base: FlatModel,
    config: TrainConfig,
    train_sel: Selection,
    personal: dict[str, Any] | None = None,
    consume_base: bool = False,
    in_place: BoundModel | None = None,
) -> tuple[TrainResult, np.ndarray]:
    """Train `model` from `base` (or take one gradient under FedSGD); the float32 update
    vector over every float tensor in manifest order, and what the task reported.

    `consume_base`: the caller drops `base` afterwards, so a float32 model's update is written
    over base's buffer (no model-sized vector besides the model and the base; a 2.4 GB model
    in a client of 2 x model). Virtual clients share one base and keep the default.

    `in_place`: `model`'s tensors are `base`'s buffer (fedclient/model_memory.py), whose bytes
    the caller saved to disk before this call (`BoundModel.save_base`): nothing to load, and the
    update is written over the model's own memory (a client of 1 x model). No `personal` then.

    Deterministic given `config.seed`: the global torch, numpy and `random` generators are
    seeded here (seed_rngs) and the default loop shuffles with its own generator, so the same
    (client, round) gives the same bytes wherever it runs (a `fedclient` process or a
    simulation worker, after any other clients).
    """
    if in_place is None:
        model.load_state_dict(to_state_dict(base, copy=False))  # load_state_dict copies
    if personal:
        model.load_state_dict(personal, strict=False)  # FedPer: keep our own layers
    before = loss_before_training(task, model, data, config)
    # Seeded after that evaluation: its DataLoader draws from torch's global generator, and
    # training must see the same draws whether or not the round asked for the loss.
    seed_rngs(config.seed)
    with trainable_only(model, train_sel):
        if config.mode == "fedsgd":
            result = task.compute_gradient(model, data.train, config)
        else:
            result = task.train(model, data.train, config)
    if before:
        result = TrainResult(result.num_examples, result.metrics | before)
    if config.mode == "fedsgd":
        # The negated gradient is a pseudo-gradient like a FedAvg delta: the strategy adds
        # server_lr x its mean, i.e. plain SGD on the averaged gradient.
        return result, -gradient_vector(model, base.manifest.floats())
    if in_place is not None and in_place.holds(base.buffer):  # not moved by the task
        vector = base.buffer.view(np.float32)
        in_place.subtract_base(vector)
        return result, vector
    state = model.state_dict()
    vector = float_delta_in_place(state, base) if consume_base else None
    return result, vector if vector is not None else float_delta(state, base)


def float_delta(state: Mapping[str, Any], base: FlatModel) -> np.ndarray:
    """state_dict minus `base` over the floating tensors, as one float32 vector in manifest
    order: float_vector(flatten_state_dict(state)) - float_vector(base), one tensor at a time
    (one model-sized result instead of four)."""
    floats = base.manifest.floats()
    out = np.empty(sum(t.numel for t in floats.tensors), dtype=np.float32)
    pos = 0
    for t in floats.tensors:
        part = out[pos : pos + t.numel]
        part[...] = _float32_numpy(state[t.name])
        np.subtract(part, base.as_float32(t.name).reshape(-1), out=part)
        pos += t.numel
    return out


def float_delta_in_place(state: Mapping[str, Any], base: FlatModel) -> np.ndarray | None:
    """`float_delta`, written over `base`'s own buffer when every tensor is float32 (the
    buffer is then the float vector): the base is consumed, no model-sized vector is made.
    None, leaving `base` untouched, for a model with tensors of other dtypes."""
    if not all(t.dtype == "float32" for t in base.manifest.tensors):
        return None
    vector = base.buffer.view(np.float32)
    for t in base.manifest.tensors:
        off, n = base.manifest.offsets[t.name]
        part = vector[off // 4 : (off + n) // 4]
        np.subtract(_float32_numpy(state[t.name]), part, out=part)
    return vector


def _float32_numpy(tensor: Any) -> np.ndarray:
    """A tensor's values as a flat float32 numpy array (a view when already float32 on CPU)."""
    import torch

    return tensor.detach().to("cpu", torch.float32).reshape(-1).numpy()
