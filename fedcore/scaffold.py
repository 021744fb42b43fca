"""SCAFFOLD's tensors on the wire (Karimireddy et al., "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020), shared by coordinator and clients.

The coordinator sends its control variate c beside the model (ModelHeader.strategy_manifest:
one float32 tensor per floating tensor of the model, same names). A client's update carries
the model delta Δy_i followed by its control-variate delta Δc_i = c_i⁺ - c_i, as extra float32
tensors named CONTROL_PREFIX + the model tensor's name (`exchanged`). So the accumulator, the
spool, secure aggregation and the codecs fold the pair as one longer vector, and the strategy
splits the mean (fedserver/strategies/scaffold.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedcore.tensors import FlatModel, Manifest, ManifestError, TensorSpec

ROUND_KEY = "scaffold"  # RoundConfig.extra: "1" in a SCAFFOLD round
CONTROL_PREFIX = "scaffold.delta_c:"  # ':' does not occur in torch state-dict names


def control_manifest(floats: Manifest) -> Manifest:
    """c (or c_i) for a model whose floating tensors are `floats`: float32, same names."""
    return Manifest(tuple(TensorSpec(t.name, "float32", t.shape) for t in floats.tensors))


def exchanged(floats: Manifest) -> Manifest:
    """What a SCAFFOLD update carries: the model's floats, then Δc_i per float tensor."""
    deltas = tuple(TensorSpec(CONTROL_PREFIX + t.name, "float32", t.shape) for t in floats.tensors)
    return Manifest(floats.tensors + deltas)


def is_scaffold_round(extra: Mapping[str, str]) -> bool:
    return extra.get(ROUND_KEY) == "1"


def control_model(floats: Manifest, values: np.ndarray) -> FlatModel:
    """A control variate (float32 vector over `floats`, manifest order) as the FlatModel that
    travels in ModelHeader.strategy_manifest."""
    manifest = control_manifest(floats)
    vector = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    if vector.size * 4 != manifest.total_bytes:
        raise ManifestError(
            f"control variate has {vector.size} values, the model's floats "
            f"{manifest.total_bytes // 4}"
        )
    return FlatModel(manifest, vector.view(np.uint8).copy())
