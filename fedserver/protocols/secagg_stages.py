"""The coordinator's side of one secure-aggregation round (SecAgg, Bonawitz et al. 2017).

Pure Python + numpy, no gRPC: the coordinator feeds it events and the servicer maps its
exceptions. Stages, each closing when every expected client acted or at its deadline if enough
did (at least the Shamir threshold t = floor(n/2) + 1 of the roster size n):

    KEYS    selected clients advertise two public keys        -> roster (U1), threshold t
    SHARES  roster members post encrypted shares for peers    -> U2 = those who posted
    MASKED  U2 members submit masked updates (SubmitUpdate)   -> survivors U3 (round machine)
    UNMASK  survivors reveal self-seed shares of U3 and mask-key shares of U2 \\ U3

The coordinator only ever holds the running sum of masked vectors; a single masked vector is
indistinguishable from uniform noise without that client's self-mask seed, which is only
rebuilt for clients whose masked update is already inside the sum.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcore.limits import excerpt
from fedcore.secagg import quantize, shamir
from fedcore.secagg.keys import PUBLIC_KEY_BYTES, KeyPair
from fedcore.secagg.masking import unmask
from fedserver.rounds.synchronous import NotSelected, StaleRound
from fedserver.updates.receiver import BadUpdate

# A share box: ChaCha20-Poly1305 over (mask-key share + self-seed share), 16-byte tag.
SHARE_CIPHERTEXT_BYTES = 2 * shamir.SHARE_BYTES + 16


class Stage(enum.Enum):
    KEYS = 1
    SHARES = 2
    MASKED = 3
    UNMASK = 4
    DONE = 5


class SecAggRefused(StaleRound):
    """A secure-aggregation message for a stage that is over or not reached.

    Maps to FAILED_PRECONDITION like any stale-round message.
    """

    reason = "secagg_stage"


class SecAggFailed(RuntimeError):
    """Too few clients remain to finish the round securely."""


@dataclass
class SecAggRound:
    round: int
    selected: frozenset[str]
    context: bytes
    num_values: int
    stage_timeout: float
    clock: Callable[[], float]
    stage: Stage = Stage.KEYS
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    roster: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    threshold: int = 0
    posted: dict[str, dict[str, bytes]] = field(default_factory=dict)
    shared: frozenset[str] = frozenset()  # U2
    survivors: tuple[str, ...] = ()  # U3, sorted
    dropped: tuple[str, ...] = ()  # U2 \ U3, sorted
    reveals: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = field(default_factory=dict)
    masked_from: set[str] = field(default_factory=set)
    total_weight: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = self.clock() + self.stage_timeout
        self._sum = np.zeros(self.num_values, dtype=np.uint64)

    # ------------------------------------------------------------------ stage progression
    def _next(self, stage: Stage) -> None:
        self.stage = stage
        self.deadline = self.clock() + self.stage_timeout

    def step(self) -> bool:
        """Close the KEYS/SHARES stage if complete or timed out with enough clients."""
        expired = self.clock() >= self.deadline
        if self.stage is Stage.KEYS:
            if self.keys.keys() >= self.selected or (expired and len(self.keys) >= 2):
                self.roster = dict(sorted(self.keys.items()))
                self.threshold = len(self.roster) // 2 + 1
                self._next(Stage.SHARES)
                return True
        elif self.stage is Stage.SHARES and (
            self.posted.keys() >= self.roster.keys()
            or (expired and len(self.posted) >= self.threshold)
        ):
            self.shared = frozenset(self.posted)
            self._next(Stage.MASKED)
            return True
        return False

    def extend(self, selected: frozenset[str]) -> None:
        """The round was re-opened: newly selected clients may still join the KEYS stage."""
        self.selected = self.selected | selected

    def _expect(self, stage: Stage, client_id: str) -> None:
        if self.stage is not stage:
            raise SecAggRefused(
                f"round {self.round} secure aggregation is in stage {self.stage.name}, "
                f"not {stage.name}; pull the current round and start again"
            )
        if client_id not in self.selected:
            raise NotSelected(f"client {excerpt(client_id)} is not selected for round {self.round}")

    # ------------------------------------------------------------------ client messages
    def advertise(self, client_id: str, channel_public: bytes, mask_public: bytes) -> None:
        if len(channel_public) != PUBLIC_KEY_BYTES or len(mask_public) != PUBLIC_KEY_BYTES:
            raise BadUpdate(f"public keys must be {PUBLIC_KEY_BYTES}-byte X25519 keys")
        if self.keys.get(client_id) == (channel_public, mask_public):
            return  # a retry
        self._expect(Stage.KEYS, client_id)
        if client_id in self.keys:
            raise BadUpdate(f"client {excerpt(client_id)} already advertised different keys")
        self.keys[client_id] = (channel_public, mask_public)

    def post_shares(self, client_id: str, shares: Mapping[str, bytes]) -> None:
        if self.posted.get(client_id) == dict(shares):
            return  # a retry
        self._expect(Stage.SHARES, client_id)
        if client_id not in self.roster:
            raise SecAggRefused(f"client {excerpt(client_id)} advertised no keys in time")
        want = self.roster.keys() - {client_id}
        if set(shares) != want:
            raise BadUpdate(
                f"shares must be addressed to exactly the {len(want)} other roster members"
            )
        # Exact sizes: boxes are stored and forwarded to peers, so none may be larger.
        if any(len(box) != SHARE_CIPHERTEXT_BYTES for box in shares.values()):
            raise BadUpdate(f"encrypted shares must be {SHARE_CIPHERTEXT_BYTES} bytes each")
        self.posted[client_id] = dict(shares)

    def check_masked(self, client_id: str, weight: float) -> None:
        self._expect(Stage.MASKED, client_id)
        if client_id not in self.shared:
            raise SecAggRefused(
                f"client {excerpt(client_id)} did not take part in the key exchange"
            )
        if self.total_weight + weight > quantize.MAX_TOTAL_WEIGHT:
            raise BadUpdate(
                f"round weight would exceed {quantize.MAX_TOTAL_WEIGHT} examples, the most a "
                "secure-aggregation round can sum without overflow",
                reason="secagg_overflow",
            )

    def fold(self, client_id: str, pieces: Iterable[tuple[int, np.ndarray]], weight: float) -> None:
        """Add one masked vector (uint64 pieces at offsets) into the running sum mod 2^64."""
        self.check_masked(client_id, weight)
        for offset, values in pieces:
            target = self._sum[offset : offset + values.size]
            np.add(target, values.astype(np.uint64, copy=False), out=target)
        self.masked_from.add(client_id)
        self.total_weight += weight

    def begin_unmask(self) -> None:
        self.survivors = tuple(sorted(self.masked_from))
        self.dropped = tuple(sorted(self.shared - self.masked_from))
        if len(self.survivors) < self.threshold:
            raise SecAggFailed(
                f"round {self.round}: {len(self.survivors)} masked updates, fewer than the "
                f"threshold {self.threshold}; the masks cannot be removed (keep --min-fit above "
                "half the clients per round so a round cannot close with so few)"
            )
        self._next(Stage.UNMASK)

    def reveal(
        self, client_id: str, seed_shares: Mapping[str, bytes], key_shares: Mapping[str, bytes]
    ) -> None:
        self._expect(Stage.UNMASK, client_id)
        if client_id not in self.survivors:
            raise SecAggRefused(f"client {excerpt(client_id)} sent no masked update this round")
        if set(seed_shares) != set(self.survivors) or set(key_shares) != set(self.dropped):
            raise BadUpdate("reveal shares for exactly the survivors and the dropped clients")
        if any(
            len(share) != shamir.SHARE_BYTES
            for share in (*seed_shares.values(), *key_shares.values())
        ):
            raise BadUpdate(f"revealed shares must be {shamir.SHARE_BYTES} bytes each")
        self.reveals[client_id] = (dict(seed_shares), dict(key_shares))

    def stop_reveals(self) -> None:
        """No more reveals: finish() runs in a worker thread and must see a frozen set."""
        if self.stage is Stage.UNMASK:
            self.stage = Stage.DONE

    def unmask_ready(self) -> bool:
        if self.stage is not Stage.UNMASK:
            return False
        if self.reveals.keys() >= set(self.survivors):
            return True
        return self.clock() >= self.deadline and len(self.reveals) >= self.threshold

    # ------------------------------------------------------------------ the result
    def finish(self) -> tuple[np.ndarray, float]:
        """(sum of the survivors' fixed-point vectors, their total weight). CPU-heavy: thread."""
        if len(self.reveals) < self.threshold:
            raise SecAggFailed(
                f"round {self.round}: {len(self.reveals)} clients revealed shares, "
                f"{self.threshold} are needed"
            )
        xs = {cid: i + 1 for i, cid in enumerate(self.roster)}

        def rebuild(owner: str, which: int) -> bytes:
            shares = {xs[r]: got[which][owner] for r, got in self.reveals.items()}
            return shamir.combine(shares, self.threshold)

        seeds = [rebuild(c, 0) for c in self.survivors]
        dropped = {d: KeyPair.from_private_bytes(rebuild(d, 1)) for d in self.dropped}
        publics = {c: self.roster[c][1] for c in self.survivors}
        total = unmask(self._sum, seeds, dropped, publics, self.context)
        self.stage = Stage.DONE
        return total, self.total_weight

    def stage_view(self, client_id: str, want: str) -> dict[str, object] | None:
        """What a client polling for "roster", "inbox" or "unmask" may see now (None: not yet)."""
        if client_id not in self.selected:
            raise NotSelected(f"client {excerpt(client_id)} is not selected for round {self.round}")
        ready_at = {"roster": Stage.SHARES, "inbox": Stage.MASKED, "unmask": Stage.UNMASK}[want]
        if self.stage.value < ready_at.value:
            return None
        if want == "roster":
            if client_id not in self.roster:
                raise SecAggRefused(f"client {excerpt(client_id)} missed the key stage")
            return {"roster": self.roster, "threshold": self.threshold}
        if want == "inbox":
            if client_id not in self.shared:
                raise SecAggRefused(f"client {excerpt(client_id)} missed the share stage")
            inbox = {s: self.posted[s][client_id] for s in sorted(self.shared) if s != client_id}
            return {"inbox": inbox, "threshold": self.threshold}
        if client_id not in self.survivors:
            raise SecAggRefused(f"client {excerpt(client_id)} sent no masked update")
        return {"survivors": self.survivors, "dropped": self.dropped}
