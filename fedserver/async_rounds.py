"""Asynchronous rounds (FedBuff): a "round" is one buffer of K contributions, i.e. one version.

Pure Python like rounds.py, and the same interface, so the Coordinator drives it unchanged:

    WAITING --enough live clients--> COLLECTING --K contributions--> AGGREGATING --complete()-->
    WAITING (the next buffer opens at once) ... --> FINISHED

Nobody is selected: every live client may pull the current version, train and submit whenever
it is done. An update names the round it was based on (the header's `round`: the buffer that
was open when the client pulled); its staleness is the number of versions published since,
`round - base`. Updates staler than `max_staleness` are refused (TooStale); a client has at
most one update in a buffer and is told to wait until that buffer is applied. `max_concurrency`
caps how many clients hold a lease (were handed the model and have not submitted) at once; a
lease lapses after `lease_seconds` so a vanished client does not hold a slot forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedserver.rounds import (
    AlreadySubmitted,
    ClosedRound,
    Phase,
    Receipt,
    RoundMachine,
    StaleRound,
)
from fedserver.staleness import StalenessWeight


class TooStale(StaleRound):
    """An update based on a version more than --max-staleness versions old."""

    reason = "too_stale"


@dataclass(frozen=True)
class AsyncPolicy:
    buffer_size: int  # K: contributions per server step (one published version)
    max_staleness: int = 10  # S: older deltas are refused
    max_concurrency: int = 0  # M: clients training at once (0: no cap)
    weight: StalenessWeight = field(default_factory=StalenessWeight)

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError("--buffer-size must be at least 1")
        if self.max_staleness < 0:
            raise ValueError("--max-staleness must be >= 0")
        if self.max_concurrency < 0:
            raise ValueError("--max-concurrency must be >= 0 (0: no cap)")


@dataclass
class BufferMachine(RoundMachine):
    buffering: AsyncPolicy = field(default_factory=lambda: AsyncPolicy(1))
    leases: dict[str, float] = field(default_factory=dict)  # client -> when it got the model
    lease_seconds: float = 0.0  # 0: the round timeout
    _freed: bool = False
    # While a buffer is applied the next one cannot take updates yet; the servicer holds them
    # for those few milliseconds instead of refusing work that will count a moment later.
    holds_submits_while_aggregating = True
    offers_to_selected_only = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lease_seconds = self.lease_seconds or self.policy.round_timeout

    # ------------------------------------------------------------------ clients
    def forget(self, client_id: str) -> None:
        super().forget(client_id)
        self.leases.pop(client_id, None)

    def renew(self, client_id: str) -> bool:
        """A Heartbeat also renews the client's lease: a long local training keeps its slot
        (and its update is awaited) instead of lapsing after `lease_seconds`."""
        if not super().renew(client_id):
            return False
        if client_id in self.leases:
            self.leases[client_id] = self.clock()
        return True

    def _active_leases(self) -> int:
        cutoff = self.clock() - self.lease_seconds
        for client in [c for c, t in self.leases.items() if t < cutoff]:
            del self.leases[client]
        return len(self.leases)

    def describe(self) -> str:
        b = self.buffering
        cap = f", at most {b.max_concurrency} training" if b.max_concurrency else ""
        return (
            f"buffer of {b.buffer_size} update(s), staleness <= {b.max_staleness} "
            f"weighted {b.weight}{cap}"
        )

    @property
    def expected_updates(self) -> int:
        return self.buffering.buffer_size

    def expects_update_from(self, client_id: str) -> bool:
        if self.phase is not Phase.COLLECTING or client_id in self.receipts:
            return False
        cap = self.buffering.max_concurrency
        return not cap or client_id in self.leases or self._active_leases() < cap

    def lease(self, client_id: str) -> None:
        self.leases.setdefault(client_id, self.clock())
        self.selected = frozenset(self.leases)

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
        if self._freed:  # a training slot came free: capped clients may get work now
            self._freed = False
            return "wake"
        return None

    def _open_buffer(self) -> None:
        self.receipts = {}
        self.attempts = 1
        self.opened_at = self.clock()
        self.deadline = math.inf  # a buffer closes when full, never on time
        self.required = self.buffering.buffer_size
        self.selected = frozenset(self.leases)
        self.phase = Phase.COLLECTING

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
                f"client {client_id!r} already has an update in the buffer of round "
                f"{self.round}; wait for it to be applied",
                self.receipts[client_id].digest,
            )

    def record(self, client_id: str, receipt: Receipt) -> None:
        super().record(client_id, receipt)
        if self.leases.pop(client_id, None) is not None and self.buffering.max_concurrency:
            self._freed = True
        self.selected = frozenset(self.leases)

    def complete(self) -> None:
        super().complete()
        self.selected = frozenset(self.leases)  # still training on older versions

    def closing_metrics(self, closed: ClosedRound) -> dict[str, float]:
        taus = [closed.round - (r.base_round or closed.round) for r in closed.receipts.values()]
        if not taus:
            return {}
        return {"staleness_mean": sum(taus) / len(taus), "staleness_max": float(max(taus))}


def build_machine(policy: object, buffering: AsyncPolicy | None, **kwargs: object) -> RoundMachine:
    """The round machine for the flags: synchronous rounds, or buffers under --mode async."""
    if buffering is None:
        return RoundMachine(policy, **kwargs)  # type: ignore[arg-type]
    return BufferMachine(policy, buffering=buffering, **kwargs)  # type: ignore[arg-type]
