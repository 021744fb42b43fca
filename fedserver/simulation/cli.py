"""`fedserver simulate`: the flags of `fedserver run` that mean something without a network,
taken from run's own parser (same names, defaults, help and checks), plus the simulation's.

The data-split and update-encoding flags are likewise `fedclient run`'s own definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedclient.flags import add_data_flags, add_device_flags
from fedcore.config import CliParser
from fedcore.logs import setup_logging
from fedcore.progress import wanted as progress_wanted
from fedserver.commands import run as run_cli
from fedserver.coordinator.assembly import EXIT_USAGE, SetupError
from fedserver.simulation.settings import ENGINES

if TYPE_CHECKING:
    from fedserver.simulation.driver import SimSettings

# `fedserver run` flags that only concern the network (or secure aggregation, which needs
# clients exchanging keys through the coordinator): left out of `simulate`, run's defaults apply.
NETWORK_ONLY = frozenset(
    {
        "host",
        "port",
        "linger",
        "tokens",
        "metrics_port",
        "metrics_host",
        "secure",
        "he_public_key",
        "secagg_stage_timeout",
    }
)
NETWORK_GROUPS = frozenset({"security"})  # --tls-*
# `fedserver run` flags whose names the virtual clients' own flags take (`--device` is where
# they train); the coordinator's held-out evaluation in a simulation runs on the CPU.
CLIENT_NAMED = frozenset({"device"})
SIM_STATE_DIR = Path("sim-state")

EPILOG = """\
Every flag can also be set as an environment variable (--clients -> FEDGRPC_CLIENTS) or in a
TOML file given with --config (a [server] table). Precedence: flag > environment > file > default.

example:
  fedserver simulate --task examples.digits:task --clients 100 --clients-per-round 10 \\
      --rounds 20 --partitioner dirichlet --alpha 0.3 --state-dir ./sim
  fedserver simulate --task examples.synthetic:task --clients 10000 --clients-per-round 100 \\
      --rounds 50 --state-dir ./sim-synthetic --ray-address auto   # on a Ray cluster
  fedserver simulate --task examples.digits:task --clients 20 --workers 0   # in this process
  fedserver status --state-dir ./sim && fedserver report --state-dir ./sim --out ./sim-report
"""


def _run_parser() -> argparse.ArgumentParser:
    """A throwaway `fedserver run` parser, to take its flag definitions from."""
    sub = argparse.ArgumentParser(add_help=False).add_subparsers()
    run_cli.add_command(sub, epilog="")
    return sub.choices["run"]  # type: ignore[no-any-return]


def _copy_actions(
    source: argparse.ArgumentParser, target: argparse.ArgumentParser, keep: object
) -> dict[str, object]:
    """Add `source`'s actions accepted by keep(action, group title) to `target`, group by
    group; returns the defaults of those left out (so settings code sees every attribute)."""
    left_out: dict[str, object] = {}
    for group in source._action_groups:
        dest_group: argparse._ArgumentGroup | None = None
        for action in group._group_actions:
            if action.dest == "help":
                continue
            if not keep(action, group.title):  # type: ignore[operator]
                left_out[action.dest] = action.default
                continue
            if dest_group is None:
                if group.title in ("positional arguments", "options", "optional arguments"):
                    dest_group = target._optionals
                else:
                    dest_group = target.add_argument_group(group.title, group.description)
            dest_group._add_action(action)
    return left_out


def _workers(text: str) -> int:
    """argparse type of --workers: a count, 0 allowed (the embedded engine in-process)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sim = sub.add_parser(
        "simulate",
        help="simulate N virtual clients against the real coordinator",
        description="Run a federation of --clients virtual clients: the coordinator is the one "
        "`fedserver run` starts (rounds, strategies, DP, checkpoints, state dir); the clients "
        "run `fedclient`'s code, K per round, in local worker processes (the embedded engine) "
        "or on Ray (--engine ray, or --ray-address for a cluster). Rerun with the same "
        "--state-dir to resume. See docs/simulation.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = sim.add_argument_group("simulation")
    g.add_argument("--clients", type=run_cli.positive_int, required=True, help="virtual clients N")
    g.add_argument(
        "--engine",
        choices=ENGINES,
        help="where virtual clients run: embedded (local worker processes, no Ray) or ray "
        "(embedded; ray when --ray-address is given)",
    )
    g.add_argument(
        "--ray-address",
        help="an existing Ray cluster (e.g. ray://head:10001 or auto); implies --engine ray; "
        "default: start a local one",
    )
    g.add_argument(
        "--client-resources",
        default="cpus=1,gpus=0",
        help="resources of one worker, i.e. of one virtual client training at a time: Ray's; "
        "for an embedded worker cpus = its torch threads and gpus > 0 = train on this "
        "machine's GPU (--device auto), as many at once as --workers (cpus=1,gpus=0)",
    )
    g.add_argument(
        "--workers",
        type=_workers,
        help="worker processes (one model replica each); embedded: 0 runs the clients in this "
        "process; default: embedded 0 on up to 2 CPUs, else one per CPU (Ray: as many as the "
        "resources allow)",
    )
    g.add_argument(
        "--fleet",
        metavar="FILE|SPEC",
        help="simulate a device fleet in fleet time (virtual clock): each client's speed, "
        "bandwidth and availability, from a SPEC such as tiers=1:4:16,diurnal=8 or a trace "
        "file (.csv/.json, one row per device); see docs/simulation.md (default: none, host time)",
    )
    g.add_argument(
        "--object-store-mb",
        type=run_cli.positive_int,
        default=128,
        help="--engine ray, local Ray only: object store size in MiB (128)",
    )
    g.add_argument(
        "--ray-temp-dir", help="--engine ray, local Ray only: its session files (Ray's /tmp/ray)"
    )

    clients = sim.add_argument_group("virtual clients (as `fedclient run`)")
    add_data_flags(clients)
    add_device_flags(clients)
    run = _run_parser()
    left_out = _copy_actions(
        run,
        sim,
        lambda a, t: a.dest not in NETWORK_ONLY | CLIENT_NAMED and t not in NETWORK_GROUPS,
    )
    for dest in CLIENT_NAMED:  # their defaults are the clients' flags', not run's
        left_out.pop(dest, None)
    # A folder of its own: `simulate` in the folder of a deployment must not resume its ./state.
    state_dir = next(a for a in sim._actions if a.dest == "state_dir")
    state_dir.default = SIM_STATE_DIR
    state_dir.help = f"checkpoints, model and history live here (./{SIM_STATE_DIR})"
    sim.set_defaults(handler=run_simulation, **left_out)


def parser() -> argparse.ArgumentParser:
    """`fedserver` with only this subcommand: what api.py parses its keyword arguments with."""
    top = CliParser(prog="fedserver")
    add_command(top.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return top


def run_simulation(args: argparse.Namespace) -> int:
    from fedserver.simulation.driver import simulate

    setup_logging(args.log_level, args.log_format)
    if args.log_level != "debug":  # a line per virtual client's update: debug only
        logging.getLogger("fedserver.updates").setLevel(logging.WARNING)
    log = logging.getLogger("fedserver")
    try:
        settings = sim_settings(args)
    except (SetupError, ValueError) as e:  # a flag's value
        log.error("%s", e)
        return EXIT_USAGE
    try:
        # Only SetupError (refused at start-up) is a usage error from here on: a ValueError
        # raised later comes from running code (a task, a client), not from a flag.
        return asyncio.run(simulate(settings)).code
    except SetupError as e:
        log.error("%s", e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def sim_settings(args: argparse.Namespace) -> SimSettings:
    """The settings of one simulation from its flags (ValueError: a flag's value)."""
    from fedserver.simulation.driver import SimSettings
    from fedserver.simulation.settings import RaySettings, parse_resources

    cpus, gpus = parse_resources(args.client_resources)
    engine = args.engine or ("ray" if args.ray_address else "embedded")
    if args.ray_address and engine != "ray":
        raise ValueError("--ray-address names a Ray cluster: it needs --engine ray")
    device = "cpu" if args.device == "auto" and gpus == 0 else args.device
    if args.ray_address is None:  # local workers see this machine's devices: check them now
        from fedcore.device import resolve_device

        resolved = resolve_device(device)
        if gpus > 0 and resolved.type == "cpu":
            logging.getLogger("fedserver").warning(
                "--client-resources gpus=%g, but --device %s finds no GPU on this machine: "
                "the virtual clients train on the CPU",
                gpus,
                device,
            )
    server = run_cli.server_settings(args)
    fleet = None
    if args.fleet:
        from fedserver.simulation.fleet import load_fleet

        fleet = load_fleet(args.fleet, args.seed, args.clients)
    if args.clients_per_round is None and math.isclose(args.fraction_fit, 1.0):
        logging.getLogger("fedserver").info(
            "every virtual client trains every round (see --clients-per-round)"
        )
    return SimSettings(
        server=replace(server, serve_finished=False, device="cpu"),
        clients=args.clients,
        partitioner=args.partitioner,
        alpha=args.alpha,
        encoding=args.encoding,
        # auto: the GPU --client-resources grants each worker (Ray sets its
        # CUDA_VISIBLE_DEVICES; embedded workers share this machine's), and the CPU when it
        # grants none.
        device=device,
        precision=args.precision,
        ray=RaySettings(
            address=args.ray_address,
            cpus=cpus,
            gpus=gpus,
            workers=args.workers,
            object_store_mb=args.object_store_mb,
            temp_dir=str(Path(args.ray_temp_dir).resolve()) if args.ray_temp_dir else None,
        ),
        progress=progress_wanted(args.log_format),
        engine=engine,
        fleet=fleet,
    )
