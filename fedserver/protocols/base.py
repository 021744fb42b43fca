"""The round protocol: what every way of running a round does, as one small interface.

A protocol is how the contributions of a round become the aggregate the strategy applies:
plain folding (FedAvg family, plus a disk spool for robust strategies), secure aggregation
(masked updates, unmasked at close) or homomorphic aggregation (ciphertexts, decrypted by a key
holder). The Coordinator owns exactly one, chosen at start-up (registry.py), and drives it
through these verbs; the protocol never sees the Coordinator, only what `ProtocolEnv` hands it.

    open(Opening)          a round (re)opens: reset per-round state (fresh) or widen it (re-open)
    round_extra()          what the round config must tell clients (RoundConfig.extra)
    check_encoding(name)   may an update use this encoding? (BadUpdate if not)
    accept(Contribution)   fold one verified update; raise SubmitRefused/BadUpdate to refuse it
    can_close()            may the round close now? (the round machine proposes, this can veto)
    aggregate()            at close: the example-weighted mean and what it is made of
    release()              the aggregate was applied (or abandoned): drop per-round resources
    state_arrays()         what must survive a restart, written with each checkpoint
    stage(kind)            the protocol's own client-facing stage ("secagg", "he") or None
    resume(past_metrics)   a restarted coordinator: what the committed rounds recorded

A protocol also declares where client-level DP noise can go (`noise`): "server" (the
coordinator sees the sum in plain and noises the mean), "clients" (it sees only masked or
encrypted sums, so each client adds its share) or None (no DP). Differential privacy is not a
protocol of its own but a wrapper around one (protocols/dp.py, a `ProtocolWrapper`), like
TFF's differential_privacy factory around an inner aggregation factory.

Like TFF's AggregationProcess (explicit state, initialize/next) and NVFlare's Aggregator
(accept/aggregate/reset). No gRPC here: the servicer maps a stage's RPCs (secure_service.py).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from fedcore.codecs import get_codec
from fedcore.durable import PageRecycler
from fedcore.limits import excerpt
from fedcore.selection import Selection
from fedcore.tensors import Manifest
from fedserver.rounds.staleness import StalenessWeight
from fedserver.strategies import UpdateSet
from fedserver.updates.receiver import BadUpdate, StagedUpdate
from fedserver.updates.uploads import Uploads


@dataclass(frozen=True)
class ProtocolSettings:
    """What the flags say about how rounds run; fixed for the life of the process."""

    name: str = "none"  # the registry key: RoundMode.protocol(--secure none | secagg | he)
    unweighted: bool = False  # every contribution weighs 1 (set by the DP wrapper)
    keep_updates: bool = False  # the strategy reads every update (median, trimmed mean, Krum)
    update_metrics: tuple[str, ...] = ()  # client metrics kept beside each update (q-FedAvg)
    partial_rounds: bool = False  # --train-tensors: each round trains a subset of the tensors
    stage_timeout: float = 30.0  # --secagg-stage-timeout: each extra stage's wait
    he_public_key: Path | None = None  # --he-public-key
    staleness: StalenessWeight | None = None  # --mode async: s(staleness) weighs each update
    max_weight_ratio: float = 0.0  # --mode async: weight <= R x recent clients' median (0: off)


@dataclass(frozen=True)
class ProtocolEnv:
    """Everything a protocol may use. Callables, so it reads the current value when it acts."""

    floats: Manifest  # the model's float tensors: what an update and the aggregate stand for
    federation_id: str
    uploads: Uploads  # streams in flight, refusal counters (for stages that receive uploads)
    clock: Callable[[], float]
    current_round: Callable[[], int]
    live_clients: Callable[[], Sequence[str]]
    touch: Callable[[str], None]  # a client was seen (may open or close a round)
    notify: Callable[[], None]  # wake long-polling clients: an offer or a stage changed
    changed: Callable[[], asyncio.Event]  # the event the next notify() sets
    # The round's population, read when a round opens and closes (the DP wrapper's sample rate).
    selected: Callable[[], Collection[str]] = frozenset  # the clients the open round selected
    expected_updates: Callable[[], int] = int  # updates the round asks for
    # Clients the round's participants were drawn from at random; a round not drawn at random
    # (an async buffer: whoever finishes first) returns its own size, i.e. a sample rate of 1.
    drawn_from: Callable[[], int] = int
    # Retired models' pages, for the next accumulator (the coordinator retires each global
    # model it replaces).
    recycler: PageRecycler = field(default_factory=PageRecycler)

    @property
    def num_values(self) -> int:
        return sum(t.numel for t in self.floats.tensors)

    @property
    def tensor_sizes(self) -> list[int]:
        return [t.numel for t in self.floats.tensors]


@dataclass(frozen=True)
class Opening:
    """A round opened (fresh) or re-opened after a deadline without quorum (not fresh)."""

    round: int
    selected: frozenset[str]
    fresh: bool


@dataclass(frozen=True)
class Contribution:
    """One verified update, about to be counted."""

    client_id: str
    # The round whose model the update was computed on: the round it is counted in, except
    # under asynchronous aggregation, where it may be up to --max-staleness rounds older.
    round: int
    staged: StagedUpdate
    weight: float  # num_examples (the DP wrapper makes it 1.0: an unweighted mean)
    num_examples: int
    selection: Selection | None  # the tensors a partial update carries (None: all)
    scale: float = 1.0  # the DP wrapper's re-clip factor for an update seen in plain
    # What the client reported with it (UpdateHeader.metrics): the DP wrapper's clip bit,
    # q-FedAvg's loss before training.
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Aggregate:
    """What the strategy applies: the mean delta, how many updates and how much weight."""

    mean: np.ndarray
    count: int
    weight: float
    updates: UpdateSet | None = None  # every update, for strategies that read them all
    metrics: dict[str, float] = field(default_factory=dict)  # recorded with the round (DP's ε)


class RoundProtocol(ABC):
    # The encoding every update must use (masked, encrypted), or None: any plain codec.
    encoding: ClassVar[str | None] = None
    # Partial updates (FedPer personal tensors) fold per tensor; not every protocol can.
    partial_updates = False
    # Where client-level DP noise can be added (see the module docstring); None: refuse DP.
    noise: ClassVar[Literal["server", "clients"] | None] = None
    # The intake measures each update's L2 norm as it arrives (the DP wrapper re-clips by it).
    needs_norm = False
    # Client metrics that are this protocol's input (Contribution.metrics), which the
    # coordinator must not record: the DP wrapper's clip bit, whose round mean is un-noised.
    private_metrics: frozenset[str] = frozenset()

    @property
    def sees_plain(self) -> bool:
        """The protocol folds updates in plain (not masked or encrypted)."""
        return self.encoding is None

    def check_metrics(self, metrics: Mapping[str, float]) -> None:
        """Refuse (BadUpdate) an update whose header metrics this protocol cannot use, before
        its bytes are read (the DP wrapper: a missing or bad clip bit)."""
        return None  # most protocols read no client metric

    def check_encoding(self, encoding: str) -> None:
        """Masked/encrypted updates only under their protocol, and only its encoding then."""
        if self.encoding is not None and encoding != self.encoding:
            raise BadUpdate(
                f"this coordinator runs secure aggregation: updates must use encoding "
                f"{self.encoding!r}, got {excerpt(encoding)}",
                reason="bad_encoding",
            )
        if self.encoding is None and get_codec(encoding).secure_only:
            raise BadUpdate(
                f"encoding {excerpt(encoding)} is for --secure aggregation, which this coordinator "
                "does not run",
                reason="bad_encoding",
            )

    @abstractmethod
    def open(self, opening: Opening) -> None: ...

    def round_extra(self) -> dict[str, str]:
        return {}

    @abstractmethod
    def accept(self, contribution: Contribution) -> None:
        """Fold a verified update; raise SubmitRefused or BadUpdate and nothing is folded."""

    def can_close(self) -> bool:
        """Veto a close the round machine proposes (e.g. a buffer not yet full)."""
        return True

    @abstractmethod
    async def aggregate(self) -> Aggregate:
        """At close (on the event loop): the aggregate of the closing round."""

    def release(self) -> None:
        """The aggregate was applied and committed: drop what the round held."""
        return None

    def decryption_for(self, client_id: str) -> int:
        """A round whose aggregate this client is asked to finish (decrypt) now, or 0."""
        return 0

    def stage(self, kind: str) -> object | None:
        """The object serving this protocol's own RPCs of `kind`, or None (not this protocol)."""
        return None

    # What survives a restart. Rounds are the unit of durability: an interrupted round is redone
    # from its start, so in-round state is deliberately volatile. A protocol that carries state
    # across rounds returns it here; it is written with each round's checkpoint.
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"protocol state {sorted(arrays)} not expected by this protocol")

    def resume(self, past_metrics: Iterable[Mapping[str, float]]) -> None:
        """A restarted coordinator: the metrics each committed round recorded, oldest first."""
        return None


class ProtocolWrapper(ABC):
    """Something that wraps whichever protocol the registry builds (differential privacy:
    protocols/dp.py). It may refuse a protocol, change the settings the inner one is built
    with, and then wraps the built protocol; the Coordinator only hands it to the registry."""

    def refuse(self, protocol: type[RoundProtocol], settings: ProtocolSettings) -> str | None:
        """Why this wrapper cannot go around `protocol` with these settings, or None."""
        return None

    def inner_settings(self, settings: ProtocolSettings) -> ProtocolSettings:
        return settings

    def exchanged(self, protocol: type[RoundProtocol], floats: Manifest) -> Manifest:
        """What an update carries around `protocol`, given what the strategy exchanges
        (`floats`): values the wrapper adds go last, and it strips them from the aggregate."""
        return floats

    @abstractmethod
    def wrap(self, inner: RoundProtocol, env: ProtocolEnv) -> RoundProtocol: ...


__all__ = [
    "Aggregate",
    "Contribution",
    "Opening",
    "ProtocolEnv",
    "ProtocolSettings",
    "ProtocolWrapper",
    "RoundProtocol",
]
