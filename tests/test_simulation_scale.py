"""A simulation round costs O(K), not O(N) (issue 25, item 5: 1,000,000 virtual clients):
the virtual clients are one Population (fedserver/rounds/population.py), whose sorted view
selects exactly the ids `random.sample(sorted(ids), k)` selects, computing only those; an
N-way data split costs 8 bytes per client; and on 2 CPUs the clients run in the driver."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedclient import partition as partition_module
from fedclient.partition import Partition, partition_indices
from fedserver.cli import build_parser
from fedserver.rounds import population as pop_module
from fedserver.rounds.population import (
    Population,
    lexicographic_rank,
    lexicographic_unrank,
)
from fedserver.rounds.synchronous import RoundMachine, RoundPolicy
from fedserver.simulation import embedded
from fedserver.simulation.cli import sim_settings
from fedserver.simulation.driver import simulate


def test_lexicographic_rank_and_unrank_match_sorted_strings() -> None:
    for count in [*range(1, 130), 999, 1000, 1001, 12345]:
        ordered = sorted(str(i) for i in range(count))
        for rank, text in enumerate(ordered):
            assert lexicographic_unrank(rank, count) == int(text)
            assert lexicographic_rank(int(text), count) == rank


def test_sorted_view_samples_what_the_sorted_list_samples() -> None:
    """Dropped members and excluded ids leave the view as they leave the list; random.sample
    draws the same ids from both, for small k (the pool path) and large k (the set path)."""
    population = Population(5000, "client-")
    for cid in ("client-17", "client-4999", "client-0"):
        assert population.drop(cid)
    assert not population.drop("client-5000") and not population.drop("client-07")
    exclude = {"client-3", "client-2000", "stranger"}
    listed = sorted(f"client-{i}" for i in range(5000))
    listed = [c for c in listed if c not in population.absent and c not in exclude]
    view = population.sorted_live(exclude=exclude)
    assert len(view) == len(listed) == population.live_count() - 2
    assert list(view) == listed
    assert "client-3" not in view and "client-4" in view and "client-0" not in view
    for seed in range(10):
        for k in (3, 100, 4000):
            assert random.Random(seed).sample(view, k) == random.Random(seed).sample(listed, k)
    population.revive_all()
    assert population.live_count() == 5000 and population.is_live("client-17")


def test_a_machine_with_a_population_selects_as_with_a_liveness_entry_each() -> None:
    """Same seed, same selection (first attempt and a re-open without the reporters) whether
    N clients are touched one by one or enlisted as a Population."""

    def machine(enlisted: bool) -> RoundMachine:
        policy = RoundPolicy(3, min_clients=2, clients_per_round=30, round_timeout=10)
        m = RoundMachine(policy, clock=lambda: 0.0, rng=random.Random(7))
        if enlisted:
            m.population = Population(3000, "client-")
        else:
            for i in range(3000):
                m.touch(f"client-{i}")
        return m

    listed, enlisted = machine(False), machine(True)
    assert listed.step() == enlisted.step() == "opened"
    assert listed.selected == enlisted.selected and len(enlisted.selected) == 30
    assert enlisted.live_count() == 3000 and not enlisted.last_seen
    first = sorted(enlisted.selected)[0]
    assert enlisted.depart(first) and listed.depart(first)
    assert not enlisted.is_live(first) and enlisted.live_count() == 2999
    enlisted.touch(first)
    assert enlisted.is_live(first) and enlisted.renew(first)


def _count_ids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every virtual client id the coordinator computes: by index (Population) or by
    sorted rank (SortedIds)."""
    counter = [0]
    unrank = pop_module.lexicographic_unrank
    getitem = Population.__getitem__
    iterate = Population.__iter__

    def counted_unrank(rank: int, count: int) -> int:
        counter[0] += 1
        return unrank(rank, count)

    def counted_getitem(self: Population, index: int | slice) -> str | list[str]:
        counter[0] += 1
        return getitem(self, index)  # type: ignore[arg-type]

    def counted_iter(self: Population) -> Iterator[str]:
        for cid in iterate(self):
            counter[0] += 1
            yield cid

    monkeypatch.setattr(pop_module, "lexicographic_unrank", counted_unrank)
    monkeypatch.setattr(Population, "__getitem__", counted_getitem)
    monkeypatch.setattr(Population, "__iter__", counted_iter)
    return counter


@pytest.mark.timeout(120)
def test_a_round_computes_ids_of_the_selected_clients_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedserver simulate` (in-process engine, Synthetic) at N = 2,000 and N = 200,000, 10
    clients a round, 3 rounds: the ids the coordinator computes stay a few per selected
    client, the same at both N. Touching, selecting or sweeping every virtual client (the
    O(N) work this replaced) would compute N ids a round."""
    counts = {}
    for n in (2000, 200_000):
        counter = _count_ids(monkeypatch)
        args = build_parser().parse_args(
            [
                *("simulate", "--task", "examples.synthetic:task", "--workers", "0"),
                *("--clients", str(n), "--clients-per-round", "10", "--rounds", "3"),
                *("--state-dir", str(tmp_path / f"n{n}"), "--log-format", "json"),
            ]
        )
        outcome = asyncio.run(simulate(sim_settings(args)))
        assert outcome.code == 0 and len(outcome.rounds) == 3
        counts[n] = counter[0]
        monkeypatch.undo()
    assert 0 < counts[200_000] <= 3 * 10 * 4, counts
    assert counts[200_000] <= 2 * counts[2000], counts


def test_an_n_way_split_costs_8_bytes_per_example_and_per_client() -> None:
    """A 1,000,000-way IID split of 1,000,000 labels is kept as one index array and the
    offsets (16 MB), not a million arrays (~100 MB of array objects); the slices are those of
    np.array_split (first n % N parts one longer)."""
    labels = np.zeros(1_000_003, np.int64)
    first = partition_indices(labels, Partition(0, 1_000_000, seed=3))
    last = partition_indices(labels, Partition(999_999, 1_000_000, seed=3))
    split = next(reversed(partition_module._SPLITS.values()))
    assert isinstance(split, partition_module.Split)
    assert split.order.nbytes + split.offsets.nbytes == 8 * (1_000_003 + 1_000_001)
    expected = np.array_split(np.random.default_rng(3).permutation(1_000_003), 1_000_000)
    assert np.array_equal(first, np.sort(expected[0])) and len(first) == 2
    assert np.array_equal(last, np.sort(expected[-1])) and len(last) == 1


def test_the_default_engine_runs_in_process_on_two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to 2 CPUs no worker process (each would import torch again): --workers 0."""
    monkeypatch.setattr(embedded, "usable_cpus", lambda: 2)
    assert embedded.default_workers(1) == 0
    monkeypatch.setattr(embedded, "usable_cpus", lambda: 8)
    assert embedded.default_workers(1) == 8 and embedded.default_workers(2) == 4
