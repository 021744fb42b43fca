"""Bit-exact comparison of torch state dicts (NaN payloads, -0.0, bool and empty tensors too)."""

from __future__ import annotations

import torch


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's storage bytes (works for 0-d, empty and bool tensors)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_state(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], ordered: bool = True
) -> None:
    """Same names (in the same order unless `ordered` is False), dtypes, shapes and bytes."""
    if ordered:
        assert list(got) == list(want)
    else:
        assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert raw_bytes(got[name]) == raw_bytes(tensor), name
