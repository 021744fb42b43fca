"""What a client computes locally around training: which parameters train, the gradient
vector (FedSGD), client-level DP, and the per-round training seed. Pure torch/numpy, no gRPC."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np

from fedcore.privacy import add_gaussian_noise, l2_clip
from fedcore.selection import Selection
from fedcore.tensors import Manifest


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
            out[pos : pos + spec.numel] = param.grad.detach().reshape(-1).float().numpy()
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


def round_seed(seed: int, client_id: str, round_number: int) -> int:
    digest = hashlib.sha256(f"{seed}:{client_id}:{round_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
