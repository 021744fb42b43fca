"""What a round mode is: how rounds run (the round machine), which protocol folds their
contributions, what clients compute, and the flags and combinations that belong to it.

A mode is one module (synchronous.py, buffered.py) plus one line in registry.py; the command
line, assembly and the coordinator only talk to this interface (docs/modes.md).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from fedserver.rounds.synchronous import RoundMachine, RoundPolicy
from fedserver.strategies import Strategy


@dataclass(frozen=True)
class Flag:
    """One flag of a mode. Its default is always None, so a flag set (on the command line, in
    FEDGRPC_* or TOML) under a mode that does not declare it is visible, and refused."""

    name: str  # without the dashes: "buffer-size"
    type: Callable[[str], object]
    metavar: str
    help: str

    @property
    def option(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


class RoundMode:
    """How rounds run. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # the --mode value
    help: ClassVar[str]  # its part of --mode's help
    client_update: ClassVar[str] = "fedavg"  # what clients send: "fedavg" delta | "fedsgd" gradient
    flags: ClassVar[tuple[Flag, ...]] = ()  # its own flags (one --help group, titled `group`)
    group: ClassVar[str] = ""  # the title of its flags' --help group ("" -> "--mode NAME")
    # Flags a resumed run must keep (a version's meaning would change mid-run): recorded in
    # the state dir's meta under their dest, "" for the modes that do not have them.
    pinned: ClassVar[tuple[str, ...]] = ()
    # Why `fedserver simulate` cannot run this mode; None: it can.
    not_simulated: ClassVar[str | None] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RoundMode:
        """The mode from the parsed flags (its own are on `args` by dest); ValueError: usage."""
        return cls()

    def refuse(self, secure: str, strategy: Strategy) -> str | None:
        """Why this mode cannot run with --secure `secure` and `strategy`; None: it can."""
        return None

    def simulation_wave(self) -> int | None:
        """`fedserver simulate`: None when the round machine selects who trains (the driver
        runs the selected); else how many virtual clients pull the model at once, for modes
        where nobody is selected and clients pull whenever they are free."""
        return None

    def machine(
        self,
        policy: RoundPolicy,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        round: int,
        joined: Callable[[str], bool],
    ) -> RoundMachine:
        """The round machine (`joined`: did an id ever Join, for machines that need to know)."""
        return RoundMachine(policy, clock=clock, rng=rng, round=round)

    def protocol(self, secure: str) -> str:
        """The protocols/registry.py key of the protocol that folds contributions."""
        return secure

    def protocol_settings(self) -> dict[str, Any]:
        """Extra ProtocolSettings fields this mode sets (e.g. the staleness weight)."""
        return {}

    def pinned_values(self) -> dict[str, str]:
        """The values of the `pinned` flags, by dest, as the state dir records them."""
        return {}

    def tracked_params(self) -> dict[str, Any]:
        """Its own settings as --track records them (under the mode's name)."""
        return {}

    def updates_per_round(self, policy: RoundPolicy) -> int:
        """The updates a round is planned to fold, known at start-up (adaptive DP clipping's
        default count noise): --clients-per-round, else the --min-clients a round waits for."""
        return policy.clients_per_round or policy.min_clients
