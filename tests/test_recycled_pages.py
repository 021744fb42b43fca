"""A round's accumulator made of the retired global model's pages (fedcore.durable.PageRecycler):
the same sums to the bit as over fresh zeros, and pages handed over only when nothing else can
still read them."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fedcore.codecs import Piece
from fedcore.durable import DIRECT_MIN, PageRecycler, owns_its_pages, page_aligned_zeros
from fedcore.files import read_safetensors, write_safetensors
from fedcore.selection import Selection
from fedcore.tensors import FlatModel, Manifest, TensorSpec
from fedserver.coordinator.publishing import off_loop
from fedserver.updates.accumulator import Accumulator

FLOATS = Manifest(
    tuple(TensorSpec(n, "float32", (s,)) for n, s in (("a", 5), ("b", 4), ("c", 3), ("d", 4)))
)
N = 16


class _Staged:
    """A stand-in for StagedUpdate: dense pieces of `cut` values, or sparse (index, value)s."""

    def __init__(self, values: np.ndarray, cut: int = 3, sparse: bool = False) -> None:
        self.values, self.cut, self.sparse = values.astype(np.float32), cut, sparse

    def pieces(self, transient: bool = False) -> Iterator[Piece]:
        if self.sparse:
            idx = np.flatnonzero(self.values)
            yield Piece(0, self.values[idx], idx)
            return
        for i in range(0, self.values.size, self.cut):
            yield Piece(i, self.values[i : i + self.cut])


def _stale() -> np.ndarray:
    memory = page_aligned_zeros(N, np.float32)
    memory[:] = np.arange(N, dtype=np.float32) * 1e6 + 7  # a retired model's values
    return memory


rng = np.random.default_rng(3)
DENSE = rng.standard_normal(N).astype(np.float32)
SIGNED_ZEROS = np.where(np.arange(N) % 2, -0.0, 1.5).astype(np.float32)
HEAD = Selection.matching(FLOATS, "c,d")  # a partial update: the last two tensors


@pytest.mark.parametrize(
    "folds",
    [
        lambda acc: acc.fold(_Staged(DENSE), 1.0),
        lambda acc: (acc.fold(_Staged(DENSE), 3.0), acc.fold(_Staged(-DENSE, cut=5), 2.0)),
        lambda acc: acc.fold(_Staged(SIGNED_ZEROS), 1.0),  # -0.0 + 0.0 is +0.0 either way
        lambda acc: acc.fold(_Staged(SIGNED_ZEROS), 2.5),
        lambda acc: (acc.fold(_Staged(DENSE[:7]), 2.0, HEAD), acc.fold(_Staged(DENSE), 1.0)),
        lambda acc: acc.fold(_Staged(np.where(DENSE > 0.5, DENSE, 0), sparse=True), 1.0),
    ],
    ids=["one", "weighted", "signed-zeros", "signed-zeros-scaled", "partial-first", "sparse"],
)
def test_stale_memory_sums_as_fresh_zeros_do(folds: Callable[[Accumulator], object]) -> None:
    sizes = [t.numel for t in FLOATS.tensors]
    fresh, reused = Accumulator(N, sizes), Accumulator(N, sizes, _stale())
    folds(fresh)
    folds(reused)
    assert reused.total.tobytes() == fresh.total.tobytes()
    assert reused.mean().tobytes() == fresh.mean().tobytes()


def test_a_fold_that_fails_midway_leaves_no_stale_values() -> None:
    class Broken(_Staged):
        def pieces(self, transient: bool = False) -> Iterator[Piece]:
            yield Piece(0, self.values[:4])
            raise OSError("spill read failed")

    acc = Accumulator(N, None, _stale())
    with pytest.raises(OSError):
        acc.fold(Broken(DENSE), 1.0)
    assert acc.total[4:].tolist() == [0.0] * (N - 4)  # as a fresh accumulator would hold


def test_memory_to_reuse_must_fit() -> None:
    with pytest.raises(ValueError, match="16 float32 values"):
        Accumulator(N, None, page_aligned_zeros(N + 1, np.float32))


def test_retired_pages_are_handed_over_once_nothing_else_reads_them() -> None:
    recycler = PageRecycler()
    total = page_aligned_zeros(N, np.float32)
    address = total.ctypes.data
    model_buffer = total.view(np.uint8)  # how a FedAvg model holds its accumulator's pages
    del total
    recycler.retire(model_buffer)
    del model_buffer
    again = recycler.take(N, np.float32)
    assert again is not None and again.ctypes.data == address and owns_its_pages(again)
    assert recycler.take(N, np.float32) is None  # handed over once
    recycler.retire(again.view(np.uint8))
    recycler.release()  # nobody took it: let go, not kept
    assert recycler.take(N, np.float32) is None


@pytest.mark.parametrize(
    "still_held",
    [
        lambda b: b,  # the model itself (a download streaming it)
        lambda b: b[8:],  # a view
        lambda b: memoryview(b),  # an exported buffer
        lambda b: b.view(np.float32)[2:],  # a view of the float32 pages
    ],
    ids=["array", "view", "memoryview", "float-view"],
)
def test_pages_something_still_reads_are_let_go(still_held: Callable[[np.ndarray], object]) -> None:
    recycler = PageRecycler()
    model_buffer = page_aligned_zeros(N, np.float32).view(np.uint8)
    held = still_held(model_buffer)
    recycler.retire(model_buffer)
    del model_buffer
    assert recycler.take(N, np.float32) is None
    assert held is not None and recycler.take(N, np.float32) is None  # dropped, not kept


def test_other_memory_or_another_size_is_not_reused() -> None:
    recycler = PageRecycler()
    recycler.retire(np.zeros(N * 4, np.uint8))  # a model loaded from a file: not our pages
    assert recycler.take(N, np.float32) is None
    recycler.retire(page_aligned_zeros(N, np.float32).view(np.uint8))
    assert recycler.take(N + 1, np.float32) is None


def test_models_of_a_megabyte_or_more_are_pages_the_next_round_can_take(tmp_path: Path) -> None:
    # The round-0 model (Task.initial_model, FlatModel.zeros) and a model resumed from a
    # checkpoint are recycled like the accumulators after them: round 2 sums into fresh pages
    # no more than round 3 does.
    big = Manifest((TensorSpec("w", "float32", (DIRECT_MIN // 4,)),))
    initial = FlatModel.zeros(big)
    initial.buffer.view(np.float32)[:] = 1.5
    path = tmp_path / "m.safetensors"
    write_safetensors(path, initial)
    assert np.array_equal(read_safetensors(path)[0].buffer, initial.buffer)

    def retired_then_taken(make: Callable[[], FlatModel]) -> np.ndarray | None:
        recycler = PageRecycler()
        model = make()
        assert owns_its_pages(model.buffer)
        recycler.retire(model.buffer)
        del model
        return recycler.take(DIRECT_MIN // 4, np.float32)

    assert retired_then_taken(lambda: FlatModel.zeros(big)) is not None
    assert retired_then_taken(lambda: read_safetensors(path)[0]) is not None
    small = FlatModel.zeros(FLOATS)  # below a megabyte: plain numpy memory, no mapping each
    assert small.buffer.base is None and not small.buffer.any()


def test_off_loop_holds_no_reference_to_its_arguments_once_answered() -> None:
    # asyncio.to_thread's work item keeps the arguments until its worker thread drops it,
    # which with a short switch interval is after the awaiting coroutine went on in most
    # calls: a replaced model then looked in use to PageRecycler.take.
    work = np.ones(1 << 18, np.float32)

    def step(model: object) -> int:
        np.add(work, 1, out=work)  # releases the GIL, as the strategy's step does
        return 7

    async def rounds() -> list[int]:
        extra = []
        for _ in range(200):
            model = object()
            before = sys.getrefcount(model)
            assert await off_loop(step, model) == 7
            extra.append(sys.getrefcount(model) - before)
        return extra

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        assert asyncio.run(rounds()) == [0] * 200
    finally:
        sys.setswitchinterval(interval)
