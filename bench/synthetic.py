"""A torch-free synthetic task of P float32 parameters, for benchmarks.

The coordinator needs nothing from a task but its round-0 model (and, optionally, held-out
data): this one builds the model with numpy, so a benchmark coordinator carries neither torch nor
a data set and its memory is the coordinator's own. Name the size in the task spec:

    fedserver run --task bench.synthetic:params_10000000 ...

The parameters are split into tensors of at most `TENSOR_VALUES` values, like the layers of a
real model (aggregation works tensor by tensor, so the tensor size bounds its temporaries).
"""

from __future__ import annotations

import re

import numpy as np

from fedcore.tensors import FlatModel, Manifest, TensorSpec

TENSOR_VALUES = 4 << 20  # 4 Mi values = 16 MiB per tensor at most


class SyntheticTask:
    """P float32 parameters, deterministic given the seed; no training data, no evaluation."""

    def __init__(self, num_params: int) -> None:
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        self.num_params = num_params

    def manifest(self) -> Manifest:
        specs, left, i = [], self.num_params, 0
        while left:
            n = min(left, TENSOR_VALUES)
            specs.append(TensorSpec(f"layer{i}.weight", "float32", (n,)))
            left -= n
            i += 1
        return Manifest(tuple(specs))

    def initial_model(self, seed: int) -> FlatModel:
        flat = FlatModel.zeros(self.manifest())
        values = flat.buffer.view(np.float32)
        rng = np.random.default_rng(seed)
        # Filled in blocks so no second model-sized temporary exists at startup either.
        for start in range(0, values.size, TENSOR_VALUES):
            block = values[start : start + TENSOR_VALUES]
            block[...] = rng.standard_normal(block.size, dtype=np.float32) * np.float32(0.01)
        return flat

    def server_test_data(self) -> None:
        return None


def __getattr__(name: str) -> SyntheticTask:
    """`params_<P>` for any P, so the task spec alone says how big the model is."""
    match = re.fullmatch(r"params_(\d+)", name)
    if match is None:
        raise AttributeError(name)
    return SyntheticTask(int(match.group(1)))
