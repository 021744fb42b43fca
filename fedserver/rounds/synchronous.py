"""The round state machine: which round is open, who is selected, when it closes.

Pure Python (no gRPC, no numpy): the coordinator feeds it events (a client was seen, an update
arrived, time passed) and acts on what it returns. Time and randomness are injected so tests
drive it deterministically.

    WAITING --enough live clients--> COLLECTING --all selected reported, or deadline + quorum-->
    AGGREGATING --complete()--> WAITING (next round) ... --> FINISHED
    COLLECTING --deadline without quorum--> COLLECTING again (re-opened, up to max_attempts)

A selected client that departs (left, reported a failure, or was not heard from for
`client_ttl` seconds) is not waited for: once every selected client has reported or departed,
the round acts at once as it would at its deadline.
"""

from __future__ import annotations

import enum
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from fedcore.limits import excerpt
from fedserver.rounds.population import Population


class Phase(enum.Enum):
    WAITING = "waiting_for_clients"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    FINISHED = "finished"


class SubmitRefused(Exception):
    """An update that must not be counted; `reason` is a stable label for metrics."""

    reason = "refused"


class StaleRound(SubmitRefused):
    reason = "stale_round"


class NotSelected(SubmitRefused):
    reason = "not_selected"


class AlreadySubmitted(SubmitRefused):
    """The client already has an update counted in this round (digest tells retry from conflict)."""

    reason = "duplicate"

    def __init__(self, message: str, digest: str) -> None:
        super().__init__(message)
        self.digest = digest


class RoundsExhausted(RuntimeError):
    """A round failed to reach quorum `max_attempts` times in a row."""


@dataclass(frozen=True)
class RoundPolicy:
    total_rounds: int
    min_clients: int = 2
    fraction_fit: float = 1.0
    clients_per_round: int | None = None
    min_fit: int | None = None
    round_timeout: float = 120.0
    max_attempts: int = 5
    client_ttl: float = 90.0  # --client-timeout: a client not heard from this long is not live
    # --overselect: select this many times the clients a round needs and close it on the first
    # arrivals (Bonawitz et al. 2019): stragglers no longer set the round's length.
    overselect: float = 1.0

    def __post_init__(self) -> None:
        if self.total_rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.min_clients < 1:
            raise ValueError("min-clients must be at least 1")
        if not 0.0 < self.fraction_fit <= 1.0:
            raise ValueError("fraction-fit must be in (0, 1]")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError("clients-per-round must be at least 1")
        if self.min_fit is not None and self.min_fit < 1:
            raise ValueError("min-fit must be at least 1")
        if self.round_timeout <= 0:
            raise ValueError("round-timeout must be positive")
        if not self.client_ttl > 0:
            raise ValueError("client-timeout must be positive")
        if not 1.0 <= self.overselect <= 100.0:
            raise ValueError(f"--overselect must be between 1 and 100, got {self.overselect}")

    def target(self, live: int) -> int:
        """Updates a round needs: it closes once it has them."""
        want = self.clients_per_round or max(1, math.ceil(self.fraction_fit * live))
        return min(live, max(want, self.min_fit or 1))

    def sample_size(self, live: int) -> int:
        """Clients selected: the target, times --overselect."""
        return min(live, math.ceil(self.target(live) * self.overselect - 1e-9))

    def quorum(self, selected: int) -> int:
        """Updates needed to close at the deadline (default: --min-clients)."""
        return max(1, min(selected, self.min_fit or self.min_clients))


@dataclass(frozen=True)
class Receipt:
    digest: str
    num_examples: int
    # The round whose model the update was computed on (0: the round it is counted in). Only
    # asynchronous aggregation (async_rounds.py) counts updates based on an earlier round.
    base_round: int = 0


@dataclass(frozen=True)
class ClosedRound:
    round: int
    receipts: dict[str, Receipt]
    opened_at: float
    closed_at: float
    attempts: int


@dataclass
class RoundMachine:
    policy: RoundPolicy
    clock: Callable[[], float]
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    round: int = 1
    phase: Phase = Phase.WAITING
    selected: frozenset[str] = frozenset()
    receipts: dict[str, Receipt] = field(default_factory=dict)
    deadline: float = math.inf
    opened_at: float = 0.0
    attempts: int = 0
    required: int = 1
    wanted: int = 1  # under --overselect, the updates that close the round at once
    # Oldest first: touch() moves a client to the end, so expiry pops from the front and every
    # event costs O(1) amortized whatever the number of connected clients (10,000 waiting
    # clients re-touch on every long-poll; a scan per touch made a join storm O(N^2)).
    last_seen: OrderedDict[str, float] = field(default_factory=OrderedDict)
    # Clients that are live without a timestamp each (a simulation's virtual clients: never
    # silent), so a round costs O(K) at N = 1,000,000 (population.py); not in last_seen.
    population: Population | None = None
    # Submits that arrive while a round is aggregated are refused (stale round) here; a machine
    # whose updates may span rounds (async_rounds.py) asks the servicer to hold them instead.
    holds_submits_while_aggregating = False
    # Selection is a seeded random draw (DP sampling amplification applies); buffers filled
    # by whoever finishes first (async_rounds.py) are not.
    samples_clients_at_random = True
    # Selected clients of the open attempt that departed without an update (expired, left or
    # failed), and who sent nothing when the round last closed or re-opened without them.
    departed: set[str] = field(default_factory=set)
    missed: list[str] = field(default_factory=list)
    missed_deadline: bool = False  # `missed` at the deadline (not: all departed before it)
    lapsed: list[str] = field(default_factory=list)  # departed by expiry, not yet logged

    def __post_init__(self) -> None:
        if self.round > self.policy.total_rounds:
            self.phase = Phase.FINISHED

    # ------------------------------------------------------------------ clients
    def touch(self, client_id: str) -> None:
        if self.population is not None and self.population.revive(client_id):
            return
        self.last_seen[client_id] = self.clock()
        self.last_seen.move_to_end(client_id)

    def forget(self, client_id: str) -> None:
        if self.population is None or not self.population.drop(client_id):
            self.last_seen.pop(client_id, None)

    def is_live(self, client_id: str) -> bool:
        """Heard from within the timeout, or a live member of the population: O(1)."""
        if client_id in self.last_seen:
            return True
        return self.population is not None and self.population.is_live(client_id)

    def renew(self, client_id: str) -> bool:
        """A Heartbeat: a live client is still at work (training or evaluating). Returns
        False for a client that is not live (never joined, or expired): it must Join again."""
        if not self.is_live(client_id):
            return False
        self.touch(client_id)
        return True

    def depart(self, client_id: str) -> bool:
        """The client is gone (it reported a failure): no longer live; True if the open round
        was waiting for its update, which it now stops doing."""
        self.forget(client_id)
        awaited = self._awaited(client_id)
        if awaited:
            self.departed.add(client_id)
        return awaited

    def _expire(self) -> None:
        cutoff = self.clock() - self.policy.client_ttl
        seen = self.last_seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= cutoff:
                return
            del seen[oldest]
            if self._awaited(oldest):  # selected, silent past the timeout
                self.departed.add(oldest)
                self.lapsed.append(oldest)

    def _awaited(self, client_id: str) -> bool:
        """The open round waits for this client's update: O(1), whatever the machine (an
        asynchronous machine's expects_update_from also counts training slots)."""
        return (
            self.phase is Phase.COLLECTING
            and client_id in self.selected
            and client_id not in self.receipts
        )

    def next_expiry(self) -> float:
        """When the least recently seen client expires (inf: nobody is live); O(1)."""
        seen = self.last_seen
        return seen[next(iter(seen))] + self.policy.client_ttl if seen else math.inf

    def live_count(self) -> int:
        """How many clients are live: O(1) amortized (use this, not len(live_clients()))."""
        self._expire()
        population = 0 if self.population is None else self.population.live_count()
        return len(self.last_seen) + population

    def live_clients(self, exclude: Collection[str] = ()) -> Sequence[str]:
        """The live clients not in `exclude`, sorted (seeded selection is reproducible):
        O(N log N), so only when a round opens or a sample is drawn, never per event; a
        population alone is a lazy sequence, O(|exclude|)."""
        self._expire()
        if self.population is not None:
            return self.population.sorted_live(self.last_seen.keys(), exclude)
        if not exclude:
            return sorted(self.last_seen)
        return [c for c in sorted(self.last_seen) if c not in exclude]

    def describe(self) -> str:
        """The open round, for the log."""
        return (
            f"{len(self.selected)} client(s) selected, deadline in {self.policy.round_timeout:.0f}s"
        )

    @property
    def expected_updates(self) -> int:
        """Updates the open round waits for (status: "received N of this")."""
        return len(self.selected)

    def lease(self, client_id: str) -> None:
        """The client was just handed the model to train (asynchronous rounds track this)."""
        return None

    def waiting_reason(self, client_id: str) -> str | None:
        """Why a live client with nothing to do waits, when the generic answer would mislead."""
        return None

    def woken(self) -> Collection[str]:
        """The long-pollers whose answer changed at the last step() that opened a round (or
        returned "wake"): here the selected clients; the other N - K keep sleeping."""
        return self.selected

    def closing_metrics(self, closed: ClosedRound) -> dict[str, float]:
        """Round-history metrics the machine itself knows about a closed round."""
        return {}

    def expects_update_from(self, client_id: str) -> bool:
        return self._awaited(client_id)

    # ------------------------------------------------------------------ lifecycle
    def step(self) -> str | None:
        """Advance on the current time; returns "opened", "close", "reopened", "wake" or None.

        "close" means the coordinator should call close() and aggregate; "wake" that offers
        changed without a round opening (long-polling clients should look again).
        """
        if self.phase is Phase.WAITING:
            if self.live_count() >= self.policy.min_clients:
                self._open(self.live_clients(), fresh=True)
                return "opened"
            return None
        if self.phase is not Phase.COLLECTING:
            return None
        # Receipts are only ever taken from selected clients (check_submit), so comparing sizes
        # says whether all reported in O(1); a subset test was O(K) on every long-poll touch.
        self.missed = []  # set below when the round moves on without someone
        everyone_reported = bool(self.selected) and len(self.receipts) >= len(self.selected)
        if everyone_reported and len(self.receipts) >= self.required:
            return "close"
        if self.policy.overselect > 1.0 and len(self.receipts) >= max(self.wanted, self.required):
            return "close"  # over-selected: the first arrivals are enough
        self._expire()  # O(1) amortized: notices selected clients that went silent
        # Nobody left to wait for: every selected client reported or departed (departed clients
        # never reported, so the sizes add up), or a re-open found nobody new to select.
        nobody_left = len(self.receipts) + len(self.departed) >= len(self.selected)
        if self.clock() < self.deadline and not nobody_left:
            return None
        self.missed = sorted(self.selected.difference(self.receipts))
        self.missed_deadline = self.clock() >= self.deadline
        if len(self.receipts) >= self.required:
            return "close"
        if self.attempts >= self.policy.max_attempts:
            raise RoundsExhausted(
                f"round {self.round} reached no quorum in {self.attempts} attempts "
                f"({len(self.receipts)} of {self.required} updates); "
                "are enough clients running? see --min-fit and --round-timeout"
            )
        candidates = self.live_clients(exclude=self.receipts)
        if self.clock() < self.deadline and not candidates:
            return None  # everyone left early, nobody to ask: wait for clients or the deadline
        self._open(candidates, fresh=False)
        return "reopened"

    def _open(self, candidates: Sequence[str], fresh: bool) -> None:
        k = self.policy.sample_size(len(candidates) + len(self.receipts)) - len(self.receipts)
        chosen = self.rng.sample(candidates, max(0, min(k, len(candidates))))
        if fresh:
            self.receipts = {}
            self.attempts = 0
            self.opened_at = self.clock()
        # Updates already received stay counted when a round is re-opened: they were computed
        # against the same global model.
        self.selected = frozenset(chosen) | self.receipts.keys()
        if fresh:
            # The quorum is fixed when the round opens: a re-open that finds fewer candidates
            # must not lower the bar.
            self.required = self.policy.quorum(len(self.selected))
            self.wanted = self.policy.target(len(candidates))
        self.attempts += 1
        self.departed = set()
        self.deadline = self.clock() + self.policy.round_timeout
        self.phase = Phase.COLLECTING

    def check_submit(self, client_id: str, round_number: int) -> None:
        """Raise SubmitRefused unless an update from `client_id` for `round_number` may count."""
        if self.phase is Phase.FINISHED:
            raise StaleRound(f"training is finished; round {round_number} is closed")
        if round_number < self.round or (
            round_number == self.round and self.phase is Phase.AGGREGATING
        ):
            raise StaleRound(
                f"round {round_number} is closed (current round: {self.round}); "
                "pull the current model and train again"
            )
        if round_number > self.round:
            raise StaleRound(f"round {round_number} has not started (current round: {self.round})")
        if self.phase is not Phase.COLLECTING:
            raise StaleRound(f"round {round_number} is not open yet (waiting for clients)")
        if client_id in self.receipts:
            raise AlreadySubmitted(
                f"client {excerpt(client_id)} already submitted for round {round_number}",
                self.receipts[client_id].digest,
            )
        if client_id not in self.selected:
            raise NotSelected(
                f"client {excerpt(client_id)} is not selected for round {round_number}"
            )

    def record(self, client_id: str, receipt: Receipt) -> None:
        self.check_submit(client_id, receipt.base_round or self.round)
        self.receipts[client_id] = receipt
        self.departed.discard(client_id)  # back in time after all (a restarted client)
        self.touch(client_id)

    def close(self) -> ClosedRound:
        if self.phase is not Phase.COLLECTING:
            raise RuntimeError(f"cannot close round {self.round} in phase {self.phase.value}")
        self.phase = Phase.AGGREGATING
        return ClosedRound(
            self.round, dict(self.receipts), self.opened_at, self.clock(), self.attempts
        )

    def complete(self) -> None:
        """The closed round is aggregated and checkpointed: move to the next one."""
        if self.phase is not Phase.AGGREGATING:
            raise RuntimeError(f"round {self.round} is not being aggregated")
        self.round += 1
        self.selected = frozenset()
        self.receipts = {}
        self.departed = set()
        self.deadline = math.inf
        self.phase = Phase.FINISHED if self.round > self.policy.total_rounds else Phase.WAITING

    @property
    def rounds_completed(self) -> int:
        return self.round - 1
