"""Partitioners: disjoint, covering, deterministic, non-empty, and skewed only when asked."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedclient.partition import SCHEMES, Partition, partition_indices


def _labels(n: int = 1000, classes: int = 10, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _split(labels: np.ndarray, count: int, **kw: object) -> list[np.ndarray]:
    # Each index computed independently, as separate client processes would.
    return [partition_indices(labels, Partition(i, count, **kw)) for i in range(count)]  # type: ignore[arg-type]


def _max_label_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return max(np.bincount(labels[p]).max() / len(p) for p in parts)


@pytest.mark.parametrize("count", [3, 10])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_disjoint_cover_nonempty_sorted(scheme: str, count: int) -> None:
    labels = _labels()
    parts = _split(labels, count, scheme=scheme, alpha=0.1)
    assert all(len(p) > 0 for p in parts)
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    merged = np.concatenate(parts)
    assert len(merged) == len(labels)
    assert np.array_equal(np.sort(merged), np.arange(len(labels)))


@pytest.mark.parametrize("count", [3, 10])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_given_seed(scheme: str, count: int) -> None:
    labels = _labels()
    first = _split(labels, count, scheme=scheme, seed=7)
    again = _split(labels, count, scheme=scheme, seed=7)
    other = _split(labels, count, scheme=scheme, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_small_alpha_is_skewed_and_iid_is_not() -> None:
    labels = _labels()
    assert _max_label_share(labels, _split(labels, 10, scheme="dirichlet", alpha=0.1)) > 0.5
    assert _max_label_share(labels, _split(labels, 10, scheme="iid")) < 0.3


def test_dirichlet_respects_minimum_size() -> None:
    labels = _labels()
    for seed in range(5):
        parts = _split(labels, 10, scheme="dirichlet", alpha=0.01, seed=seed)
        assert min(len(p) for p in parts) >= 10


def test_shards_give_each_partition_few_labels() -> None:
    labels = _labels()
    parts = _split(labels, 10, scheme="shards")
    # Two label-sorted shards of ~50 examples each can straddle at most two labels apiece.
    assert all(len(np.unique(labels[p])) <= 4 for p in parts)


def test_quantity_skews_sizes_not_labels() -> None:
    labels = _labels()
    sizes = [len(p) for p in _split(labels, 10, scheme="quantity", alpha=0.5)]
    assert max(sizes) > 3 * min(sizes)
    big = max(_split(labels, 10, scheme="quantity", alpha=0.5), key=len)
    assert np.bincount(labels[big]).max() / len(big) < 0.3


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    n=st.integers(20, 300),
    count=st.integers(1, 10),
    scheme=st.sampled_from(SCHEMES),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**16),
)
def test_any_split_is_a_partition(n: int, count: int, scheme: str, alpha: float, seed: int) -> None:
    labels = _labels(n, classes=5, seed=seed)
    parts = _split(labels, count, scheme=scheme, alpha=alpha, seed=seed)
    assert all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_too_few_examples_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot split 5 examples"):
        partition_indices(np.zeros(5, dtype=int), Partition(0, 3, scheme="shards"))


@pytest.mark.parametrize(
    ("text", "index", "count"), [("0/3", 0, 3), ("2/3", 2, 3), (" 9 / 10 ", 9, 10), ("0/1", 0, 1)]
)
def test_parse_good(text: str, index: int, count: int) -> None:
    assert Partition.parse(text) == Partition(index, count)


def test_parse_passes_keywords_through() -> None:
    p = Partition.parse("1/4", scheme="dirichlet", alpha=0.3, seed=5)
    assert p == Partition(1, 4, scheme="dirichlet", alpha=0.3, seed=5)


@pytest.mark.parametrize("text", ["3/3", "4/3", "-1/3", "1/0", "0/0", "1", "a/b", "1/2/3", ""])
def test_parse_bad(text: str) -> None:
    with pytest.raises(ValueError, match=r"partition must look like I/N with 0 <= I < N, got"):
        Partition.parse(text)


def test_parse_error_quotes_input() -> None:
    with pytest.raises(ValueError, match=r"got '3/3'$"):
        Partition.parse("3/3")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"index": 0, "count": 2, "scheme": "zipf"}, "unknown partition scheme"),
        ({"index": 0, "count": 2, "alpha": 0.0}, "alpha must be > 0"),
        ({"index": 2, "count": 2}, "0 <= index < count"),
        ({"index": 0, "count": 0}, "count must be >= 1"),
    ],
)
def test_invalid_partition(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Partition(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_split_computed_once_across_clients_and_rounds(
    scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulation worker cuts every client's slice, every round, from one computed split."""
    from fedclient import partition

    labels, count, kw = _labels(), 20, {"scheme": scheme, "alpha": 0.3, "seed": 7}
    expected = [
        np.sort(part)
        for part in partition._assign(labels, Partition(0, count, **kw))  # type: ignore[arg-type]
    ]
    monkeypatch.setattr(partition, "_SPLITS", type(partition._SPLITS)())
    calls: list[Partition] = []
    real = partition._assign

    def counting(labels: np.ndarray, p: Partition) -> list[np.ndarray]:
        calls.append(p)
        return real(labels, p)

    monkeypatch.setattr(partition, "_assign", counting)
    for _round in range(3):
        got = _split(labels, count, **kw)
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    assert len(calls) == 1
    # Another seed, count or label array is another split; the cached one stays read-only.
    _split(labels, count, **{**kw, "seed": 8})
    _split(labels[:-1], count, **kw)
    _split(labels, count + 1, **kw)
    assert len(calls) == 4
    partition_indices(labels, Partition(0, count, **kw))[0] = -1  # callers get a copy
    cached = partition._SPLITS[next(reversed(partition._SPLITS))]
    with pytest.raises(ValueError, match="read-only"):
        cached[0][0] = 0
