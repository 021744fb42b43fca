"""Which round mode a name (the `--mode` flag) stands for. Adding a mode: write its module (a
RoundMode subclass, docs/modes.md) and add one line here; its flags, --help text, refusals
and resume check come with it."""

from __future__ import annotations

import argparse

from fedserver.modes.base import Flag, RoundMode
from fedserver.modes.buffered import Buffered
from fedserver.modes.synchronous import FedAvg, FedSGD

MODES: dict[str, type[RoundMode]] = {"fedavg": FedAvg, "fedsgd": FedSGD, "async": Buffered}
DEFAULT_MODE = "fedavg"


def _owners() -> dict[str, tuple[Flag, list[str]]]:
    """Every mode's flag by dest, with the modes that declare it (a flag may be shared)."""
    owners: dict[str, tuple[Flag, list[str]]] = {}
    for name, mode in MODES.items():
        for flag in mode.flags:
            owners.setdefault(flag.dest, (flag, []))[1].append(name)
    return owners


def add_mode_flags(parser: argparse.ArgumentParser) -> None:
    """--mode with one choice per registered mode, then each mode's own flags in a group."""
    parser.add_argument(
        "--mode",
        default=DEFAULT_MODE,
        choices=list(MODES),
        help="; ".join(f"{name}: {mode.help}" for name, mode in MODES.items())
        + f" ({DEFAULT_MODE})",
    )
    added: set[str] = set()
    for name, mode in MODES.items():
        todo = [f for f in mode.flags if f.dest not in added]
        if not todo:
            continue
        group = parser.add_argument_group(mode.group or f"--mode {name}")
        for f in todo:
            group.add_argument(f.option, type=f.type, default=None, metavar=f.metavar, help=f.help)
            added.add(f.dest)


def mode_from_args(args: argparse.Namespace) -> RoundMode:
    """The chosen mode (ValueError: a usage error, e.g. another mode's flag was set)."""
    chosen = MODES[args.mode]
    own = {f.dest for f in chosen.flags}
    for dest, (flag, names) in _owners().items():
        if dest not in own and getattr(args, dest, None) is not None:
            # Silently ignored it would look like it worked: say so instead.
            modes = " or ".join(f"--mode {n}" for n in names)
            raise ValueError(f"{flag.option} is for {modes} (this run is --mode {args.mode})")
    return chosen.from_args(args)


def pinned(mode: RoundMode) -> list[tuple[str, str, str]]:
    """(state-dir meta key, flag, value) that a resumed run must keep: --mode, then every
    mode's pinned flags ("" where this mode has no such flag)."""
    values = mode.pinned_values()
    rows = [("mode", "--mode", mode.name)]
    seen: set[str] = set()
    for other in MODES.values():
        for flag in (f for f in other.flags if f.name in other.pinned):
            if flag.dest not in seen:
                seen.add(flag.dest)
                rows.append((flag.dest, flag.option, values.get(flag.dest, "")))
    return rows
