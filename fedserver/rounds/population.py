"""A population of always-live clients that costs O(1) memory, whatever its size.

`fedserver simulate` registers its N virtual clients `PREFIX0` ... `PREFIX{N-1}` as one
Population instead of N liveness entries: a virtual client has no connection that could go
silent, so the round machine needs no timestamp per client, only the few that departed (a
failed client is not live until the simulation touches its clients again). At N = 1,000,000 the
liveness dict and the sorted list every round opened with were ~250 MB and seconds per round.

Selection draws `rng.sample(sorted(live), k)`; `sorted_live()` is that sorted list as a lazy
Sequence whose i-th id is computed (the i-th decimal string in lexicographic order) in
O(log² N), so `random.sample` picks the very same ids as from the list, in O(k).
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import overload


class Population(Sequence[str]):
    """The ids PREFIX0 .. PREFIX{count-1} in index order (what a list of them would be), and
    which of them are live: all but those dropped since the last `revive_all`."""

    def __init__(self, count: int, prefix: str) -> None:
        if count < 0:
            raise ValueError(f"population size must be >= 0, got {count}")
        self.count = count
        self.prefix = prefix
        self.absent: set[str] = set()  # members that departed (failed) since revive_all

    # -------------------------------------------------------------- the Sequence, index order
    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError("population index out of range")
        return f"{self.prefix}{index}"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.prefix}{i}" for i in range(self.count))

    def __contains__(self, client_id: object) -> bool:
        """A member (live or not): O(1), not Sequence's scan."""
        return isinstance(client_id, str) and self.index_of(client_id) is not None

    def index_of(self, client_id: str) -> int | None:
        """The member's index, None for any other id ("client-07" is not "client-7")."""
        if not client_id.startswith(self.prefix):
            return None
        digits = client_id[len(self.prefix) :]
        if not digits.isascii() or not digits.isdigit() or (digits[0] == "0" and digits != "0"):
            return None
        index = int(digits)
        return index if index < self.count else None

    # -------------------------------------------------------------- liveness
    def live_count(self) -> int:
        return self.count - len(self.absent)

    def is_live(self, client_id: str) -> bool:
        return client_id not in self.absent and client_id in self

    def revive(self, client_id: str) -> bool:
        """The client was heard from; False if it is no member (the caller tracks it)."""
        if client_id not in self:
            return False
        self.absent.discard(client_id)
        return True

    def drop(self, client_id: str) -> bool:
        """The client departed; False if it is no member."""
        if client_id not in self:
            return False
        self.absent.add(client_id)
        return True

    def revive_all(self) -> None:
        """Every member is live again (what touching all of them did)."""
        self.absent.clear()

    def sorted_live(
        self, others: Iterable[str] = (), exclude: Collection[str] = ()
    ) -> Sequence[str]:
        """`sorted(live members + others)` without those in `exclude`: lazy (O(|absent| +
        |exclude|) to build) when `others` is empty, as in a simulation; a list otherwise."""
        extra = [c for c in others if c not in exclude]
        if extra:
            members = (c for c in self if c not in self.absent and c not in exclude)
            return sorted([*extra, *members])
        skipped = {c for c in (*self.absent, *exclude) if c in self}
        ranks = sorted(lexicographic_rank(self.index_of(c) or 0, self.count) for c in skipped)
        return SortedIds(self, ranks)


class SortedIds(Sequence[str]):
    """The members in sorted (string) order, without those at `skipped` ranks (sorted)."""

    def __init__(self, population: Population, skipped: list[int]) -> None:
        self.population = population
        self.skipped = skipped
        self.lookups = 0  # ids computed: what tests count to check selection stays O(k)

    def __len__(self) -> int:
        return self.population.count - len(self.skipped)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("index out of range")
        self.lookups += 1
        rank = index
        for s in self.skipped:  # the index-th rank not skipped: each skip at or below shifts it
            if s > rank:
                break
            rank += 1
        p = self.population
        return f"{p.prefix}{lexicographic_unrank(rank, p.count)}"

    def __iter__(self) -> Iterator[str]:
        """All of them (random.sample lists a population of up to ~4k ids first): one sort
        in C, not an unrank per id (53 µs each)."""
        skipped = set(self.skipped)
        ordered = sorted(self.population)
        return (cid for rank, cid in enumerate(ordered) if rank not in skipped)

    def __contains__(self, client_id: object) -> bool:
        p = self.population
        if not isinstance(client_id, str) or (index := p.index_of(client_id)) is None:
            return False
        rank = lexicographic_rank(index, p.count)
        i = bisect.bisect_left(self.skipped, rank)
        return not (i < len(self.skipped) and self.skipped[i] == rank)


def _with_prefix(prefix: int, n: int) -> int:
    """How many of 1..n have the decimal prefix `prefix` (itself included)."""
    total, first, last = 0, prefix, prefix
    while first <= n:
        total += min(n, last) - first + 1
        first, last = first * 10, last * 10 + 9
    return total


def lexicographic_unrank(rank: int, count: int) -> int:
    """The number whose decimal string is at `rank` in sorted(str(i) for i in range(count))."""
    if rank == 0:
        return 0  # "0" sorts before every other number
    n, k, current = count - 1, rank - 1, 1  # k-th (0-based) of 1..n in the decimal prefix tree
    while k > 0:
        below = _with_prefix(current, n)
        if below <= k:  # not in this subtree: the next sibling
            k -= below
            current += 1
        else:  # in it: its first child
            k -= 1
            current *= 10
    return current


def lexicographic_rank(number: int, count: int) -> int:
    """Inverse of lexicographic_unrank: how many of str(0..count-1) sort before str(number)."""
    if number == 0:
        return 0
    digits, n = str(number), count - 1
    rank = 1 + len(digits) - 1  # "0", and every proper prefix of `number` (all below it)
    for i, char in enumerate(digits):
        head = int(digits[:i] or "0") * 10
        for d in range(1 if i == 0 else 0, int(char)):
            rank += _with_prefix(head + d, n)
    return rank
