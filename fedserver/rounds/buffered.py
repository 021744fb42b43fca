"""Asynchronous rounds (FedBuff): a "round" is one buffer of K contributions, i.e. one version.

Pure Python like rounds.py, and the same interface, so the Coordinator drives it unchanged:

    WAITING --enough live clients--> COLLECTING --K contributions--> AGGREGATING --complete()-->
    WAITING (the next buffer opens at once) ... --> FINISHED

Nobody is selected: every live client may pull the current version, train and submit whenever
it is done. An update names the round it was based on (the header's `round`: the buffer that
was open when the client pulled); its staleness is the number of versions published since,
`round - base`. Updates staler than `max_staleness` are refused (TooStale); a client has at
most one update in a buffer and is told to wait until that buffer is applied. A client may
submit only while it holds a lease: it was handed the model and has not submitted since.
`max_concurrency` caps how many hold one at once; a lease lapses after `lease_seconds`
(--round-timeout) so a vanished client does not hold a slot forever. `max_contributions` of
any `contribution_window` versions bound one client's share (docs/security.md).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedcore.limits import excerpt
from fedserver.rounds.staleness import StalenessWeight
from fedserver.rounds.synchronous import (
    AlreadySubmitted,
    ClosedRound,
    NotSelected,
    Phase,
    Receipt,
    RoundMachine,
    StaleRound,
)


class TooStale(StaleRound):
    """An update based on a version more than --max-staleness versions old."""

    reason = "too_stale"


class NoLease(StaleRound):
    """A live client submits without holding a lease: it lapsed (--round-timeout), the
    coordinator restarted, or the client never pulled. FAILED_PRECONDITION: it pulls again."""

    reason = "no_lease"


class OverContributionLimit(StaleRound):
    """A client already in --max-contributions of the last --contribution-window versions."""

    reason = "contribution_limit"


@dataclass(frozen=True)
class AsyncPolicy:
    buffer_size: int  # K: contributions per server step (one published version)
    max_staleness: int = 10  # S: older deltas are refused
    max_concurrency: int = 0  # M: clients training at once (0: no cap)
    weight: StalenessWeight = field(default_factory=StalenessWeight)
    # One client's share: at most L of any W consecutive versions (0: no limit), and (in
    # protocols/buffered.py) a weight of at most R x the median of recent clients' weights.
    max_contributions: int = 5  # L
    contribution_window: int = 10  # W
    max_weight_ratio: float = 4.0  # R (0: no cap)

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError("--buffer-size must be at least 1")
        if self.max_staleness < 0:
            raise ValueError("--max-staleness must be >= 0")
        if self.max_concurrency < 0:
            raise ValueError("--max-concurrency must be >= 0 (0: no cap)")
        if self.max_contributions < 0:
            raise ValueError("--max-contributions must be >= 0 (0: no limit)")
        if self.contribution_window < 1:
            raise ValueError("--contribution-window must be at least 1")
        if self.max_contributions > self.contribution_window:
            raise ValueError(
                f"--max-contributions {self.max_contributions} is more than "
                f"--contribution-window {self.contribution_window} versions"
            )
        if not (self.max_weight_ratio == 0 or self.max_weight_ratio >= 1):
            raise ValueError("--max-weight-ratio must be at least 1 (0: no cap)")

    @property
    def limit_needs(self) -> int:
        """Live clients needed to fill every buffer without anyone beyond the limit:
        ceil(K W / L). With fewer the limit is not applied (it would stall the federation)."""
        if not self.max_contributions:
            return 0
        return -(-self.buffer_size * self.contribution_window // self.max_contributions)


@dataclass
class BufferMachine(RoundMachine):
    """Every per-client structure here is O(1) per event and bounded by live identities:
    `leases` is oldest first (lapsed ones pop from the front), waiters are drained, and maps
    keyed by client are pruned to live clients once they outgrow them (amortized O(1))."""

    buffering: AsyncPolicy = field(default_factory=lambda: AsyncPolicy(1))
    # client -> when it was handed the model; oldest first. A lease is the right to submit one
    # update; it lapses after `lease_seconds` and then frees its concurrency slot.
    leases: OrderedDict[str, float] = field(default_factory=OrderedDict)
    lease_seconds: float = 0.0  # 0: the round timeout (--round-timeout)
    # Did this id ever Join (the coordinator passes the state dir's record)? None: is it live.
    joined: Callable[[str], bool] | None = None
    # Long-pollers, by what they wait for: a buffer to open (the machine was not collecting,
    # their update is in the open buffer, or they are at their contribution limit), or a free
    # training slot (--max-concurrency). Only those whose answer changed are woken.
    _wait_open: dict[str, None] = field(default_factory=dict)
    _wait_slot: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _to_wake: list[str] = field(default_factory=list)
    _freed: int = 0  # training slots freed since the last step()
    # client -> the versions it contributed to within the window, oldest first
    _contributed: dict[str, deque[int]] = field(default_factory=dict)
    # While a buffer is applied the next one cannot take updates yet; the servicer holds them
    # for those few milliseconds instead of refusing work that will count a moment later.
    holds_submits_while_aggregating = True
    # Buffers are filled by whoever finishes first, not by a random draw: no DP amplification.
    samples_clients_at_random = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lease_seconds = self.lease_seconds or self.policy.round_timeout

    # ------------------------------------------------------------------ clients
    def forget(self, client_id: str) -> None:
        super().forget(client_id)
        if self.leases.pop(client_id, None) is not None and self.buffering.max_concurrency:
            self._freed += 1  # its slot is free now
        self._wait_open.pop(client_id, None)
        self._wait_slot.pop(client_id, None)

    def renew(self, client_id: str) -> bool:
        """A Heartbeat also renews the client's lease: a long local training keeps its slot
        (and its update is awaited) instead of lapsing after `lease_seconds`; a client that
        stops heartbeating loses its slot `lease_seconds` after its last sign of life."""
        if not super().renew(client_id):
            return False
        if client_id in self.leases:
            self.leases[client_id] = self.clock()
            self.leases.move_to_end(client_id)  # oldest first stays true
        return True

    def _expire_leases(self) -> int:
        """Drop lapsed leases (O(1) amortized: oldest first); returns how many are held."""
        cutoff = self.clock() - self.lease_seconds
        leases = self.leases
        while leases:
            oldest = next(iter(leases))
            if leases[oldest] >= cutoff:
                break
            del leases[oldest]
            if self.buffering.max_concurrency:
                self._freed += 1
        return len(leases)

    def _prune(self, by_client: dict[str, Any], extra: int = 0) -> int:
        """Keep a per-client map within twice the live clients: once it outgrows that, drop
        the entries of clients no longer live (O(size), at most once per doubling); returns
        how many were dropped."""
        if len(by_client) <= 2 * self.live_count() + extra + 16:
            return 0
        gone = [c for c in by_client if not self.is_live(c)]
        for client in gone:
            del by_client[client]
        return len(gone)

    def describe(self) -> str:
        b = self.buffering
        cap = f", at most {b.max_concurrency} training" if b.max_concurrency else ""
        limit = (
            f", at most {b.max_contributions} of {b.contribution_window} versions per client"
            if b.max_contributions
            else ""
        )
        return (
            f"buffer of {b.buffer_size} update(s), staleness <= {b.max_staleness} "
            f"weighted {b.weight}{cap}{limit}"
        )

    @property
    def expected_updates(self) -> int:
        return self.buffering.buffer_size

    def _at_limit(self, client_id: str) -> bool:
        b = self.buffering
        past = self._contributed.get(client_id)
        if not b.max_contributions or not past:
            return False
        oldest = self.round - b.contribution_window
        while past and past[0] <= oldest:
            past.popleft()
        return len(past) >= b.max_contributions and self.live_count() >= b.limit_needs

    def expects_update_from(self, client_id: str) -> bool:
        """May this client be handed the model to train now? Records what a refused client
        waits for, so that only the clients whose answer changes are woken."""
        # At its contribution limit a client waits too: the window moves with the next version.
        if (
            self.phase is not Phase.COLLECTING
            or client_id in self.receipts
            or self._at_limit(client_id)
        ):
            self._wait_open[client_id] = None
            self._prune(self._wait_open)
            return False
        cap = self.buffering.max_concurrency
        if client_id in self.leases or not cap or self._expire_leases() < cap:
            return True
        self._wait_slot[client_id] = None
        self._prune(self._wait_slot)
        return False

    def lease(self, client_id: str) -> None:
        if client_id not in self.leases:
            self.leases[client_id] = self.clock()
            dropped = self._prune(self.leases, self.buffering.max_concurrency)
            if self.buffering.max_concurrency:
                self._freed += dropped
        self._wait_slot.pop(client_id, None)

    def waiting_reason(self, client_id: str) -> str | None:
        b = self.buffering
        if client_id in self._wait_slot:
            return (
                f"all {b.max_concurrency} training slots are taken (--max-concurrency); "
                "waiting for one to come free"
            )
        if self.phase is Phase.COLLECTING and self._at_limit(client_id):
            return (
                f"contributed to {b.max_contributions} of the last {b.contribution_window} "
                "versions (--max-contributions); waiting for the next version"
            )
        return None

    def woken(self) -> list[str]:
        """The long-pollers whose answer changed since the last step()."""
        woken, self._to_wake = self._to_wake, []
        return woken

    # ------------------------------------------------------------------ lifecycle
    def step(self) -> str | None:
        if self.phase is Phase.WAITING:
            if self.live_count() >= self.policy.min_clients:
                self._open_buffer()
                return "opened"
            return None
        if self.phase is not Phase.COLLECTING:
            return None
        if len(self.receipts) >= self.buffering.buffer_size:
            return "close"
        self._expire_leases()
        if self._freed:  # training slots came free: wake as many slot waiters, oldest first
            waiters = self._wait_slot
            while self._freed and waiters:
                client = next(iter(waiters))
                del waiters[client]
                self._to_wake.append(client)
                self._freed -= 1
            self._freed = 0
            if self._to_wake:
                return "wake"
        return None

    def _open_buffer(self) -> None:
        self.receipts = {}
        self.attempts = 1
        self.opened_at = self.clock()
        self.deadline = math.inf  # a buffer closes when full, never on time
        self.required = self.buffering.buffer_size
        self.phase = Phase.COLLECTING
        # Whoever waited for a buffer to open; those waiting for a slot still wait.
        self._to_wake.extend(self._wait_open)
        self._wait_open = {}

    def staleness(self, base_round: int) -> int:
        return self.round - base_round

    def check_submit(self, client_id: str, round_number: int) -> None:
        if self.phase is Phase.FINISHED:
            raise StaleRound(f"training is finished; version {self.round - 1} was the last")
        if round_number > self.round or round_number < 1:
            raise StaleRound(f"round {round_number} has not started (current round: {self.round})")
        if self.phase is not Phase.COLLECTING:
            raise StaleRound(f"round {self.round} is not open yet (waiting for clients)")
        staleness = self.staleness(round_number)
        if staleness > self.buffering.max_staleness:
            raise TooStale(
                f"update based on round {round_number} is {staleness} versions old, more than "
                f"--max-staleness {self.buffering.max_staleness}; pull the current model and "
                "train again"
            )
        if client_id in self.receipts:
            raise AlreadySubmitted(
                f"client {excerpt(client_id)} already has an update in the buffer of round "
                f"{self.round}; wait for it to be applied",
                self.receipts[client_id].digest,
            )
        self._check_lease(client_id)
        if self._at_limit(client_id):
            b = self.buffering
            raise OverContributionLimit(
                f"client {client_id!r} already contributed to {b.max_contributions} of the "
                f"last {b.contribution_window} versions (--max-contributions); wait for the "
                "next version and pull the model again"
            )

    def _check_lease(self, client_id: str) -> None:
        """Only a client handed the model may submit (what --max-concurrency counts): one that
        never joined is refused like an unselected one in a synchronous round."""
        self._expire_leases()
        if client_id in self.leases:
            return
        # A client that joined but trained past its lease (or past its liveness) is honest:
        # FAILED_PRECONDITION, and it pulls again. Only an id that never joined is a stranger.
        self.live_count()  # expire clients that went quiet
        joined = self.is_live(client_id) or (self.joined is not None and self.joined(client_id))
        if not joined:
            raise NotSelected(
                f"client {client_id!r} has not joined: call Join and pull the model "
                "(GetGlobalModel) before submitting an update"
            )
        raise NoLease(
            f"client {client_id!r} holds no lease on round {self.round}: a lease is given with "
            f"the model and lapses after {self.lease_seconds:.0f} s (--round-timeout), and a "
            "restarted coordinator holds none; pull the current model and train again"
        )

    def record(self, client_id: str, receipt: Receipt) -> None:
        super().record(client_id, receipt)
        if self.leases.pop(client_id, None) is not None and self.buffering.max_concurrency:
            self._freed += 1
        if self.buffering.max_contributions:
            self._contributed.setdefault(client_id, deque()).append(self.round)
            self._prune(self._contributed)

    def closing_metrics(self, closed: ClosedRound) -> dict[str, float]:
        taus = [closed.round - (r.base_round or closed.round) for r in closed.receipts.values()]
        if not taus:
            return {}
        return {"staleness_mean": sum(taus) / len(taus), "staleness_max": float(max(taus))}
