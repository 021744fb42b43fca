"""`fedserver COMMAND`: the coordinator's entry point; wires every subcommand's parser.

`run` lives in run_cli.py, `simulate` in simulation/cli.py; certs/tokens in security/cli.py,
health in remote.py, report in report.py. The small state-dir commands (keygen, he-keygen,
export, status) stay here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from fedcore.config import CliParser, parse_layered, quiet_broken_pipe
from fedcore.sealed import KeyExists, StateCipher, generate_key_file
from fedcore.security import SecurityError, add_tls_arguments
from fedcore.tensors import ManifestError
from fedserver.commands import certs as security_cli
from fedserver.commands import remote, report
from fedserver.commands import run as run_cli
from fedserver.coordinator.assembly import EXIT_USAGE
from fedserver.simulation import cli as simulation_cli
from fedserver.state.history import read_status
from fedserver.state.store import export_model

EPILOG = """\
Every flag can also be set as an environment variable (--round-timeout -> FEDGRPC_ROUND_TIMEOUT)
or in a TOML file given with --config (a [server] table: round-timeout = 60).
Precedence: flag > environment > file > default.

example:
  fedserver run --task examples.digits:task --rounds 20 --min-clients 3 --state-dir ./state
  fedserver status --state-dir ./state --json
  fedserver certs --out ./certs --server-name coord.example.org --clients 3   # then, with mTLS:
  fedserver run --task examples.digits:task --host 0.0.0.0 \\
      --tls-cert certs/server.crt --tls-key certs/server.key --tls-ca certs/ca.crt
  fedserver keygen state.key && fedserver run ... --encrypt-state state.key
  fedserver export --state-dir ./state --out model.safetensors --decrypt --key state.key
"""


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="fedserver",
        description="fedgrpc coordinator: serves the global model and aggregates client updates.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_cli.add_command(sub, epilog=EPILOG)
    simulation_cli.add_command(sub)

    keygen = sub.add_parser(
        "keygen",
        help="create a random key file for --encrypt-state",
        description="Write a random 256-bit AES key to KEYFILE (mode 600). Keep it apart from "
        "the state dir: whoever holds both can read the model. An existing KEYFILE is kept "
        "unless --force.",
    )
    keygen.add_argument("keyfile", type=Path, metavar="KEYFILE")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(handler=_keygen)

    he_keygen = sub.add_parser(
        "he-keygen",
        help="create the shared CKKS key pair for homomorphic aggregation (TenSEAL)",
        description="Write he-secret.ctx (give to every client, never to the coordinator) and "
        "he-public.ctx (the coordinator: it can add ciphertexts but not decrypt them) to DIR, "
        "both mode 600. Existing files are kept unless --force.",
    )
    he_keygen.add_argument("out_dir", type=Path, metavar="DIR")
    he_keygen.add_argument(
        "--force", action="store_true", help="replace existing key files (clients need the new one)"
    )
    he_keygen.set_defaults(handler=_he_keygen)

    export = sub.add_parser(
        "export",
        help="write the model (or a round's checkpoint) from a state dir as plain safetensors",
    )
    export.add_argument("--config", type=Path, help="TOML file with a [server] table")
    export.add_argument("--state-dir", type=Path, default=Path("state"), help="(./state)")
    export.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    export.add_argument("--round", type=int, help="export this round's checkpoint (the latest)")
    export.add_argument(
        "--decrypt",
        action="store_true",
        help="the state dir is encrypted: decrypt with --key and write plaintext",
    )
    export.add_argument("--key", type=Path, metavar="KEYFILE", help="key for --decrypt")
    export.set_defaults(handler=_export)

    status = sub.add_parser(
        "status", help="print a run's progress from its state dir or a live coordinator"
    )
    status.add_argument("--config", type=Path, help="TOML file with a [server] table")
    status.add_argument("--state-dir", type=Path, default=Path("state"), help="(./state)")
    status.add_argument(
        "--server", help="ask a running coordinator at HOST:PORT instead of reading --state-dir"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_tls_arguments(status, server=False)
    status.set_defaults(handler=_print_status)
    security_cli.add_commands(sub)
    remote.add_commands(sub)
    report.add_commands(sub)
    return parser


def _print_status(args: argparse.Namespace) -> int:
    try:
        status = remote.live_status(args) if args.server else read_status(args.state_dir)
    except PermissionError as e:
        print(
            f"fedserver: cannot read {e.filename or args.state_dir}: permission denied; a state "
            "dir is private to the coordinator's user (docs/security.md): run as that user, or "
            "ask the live coordinator with --server",
            file=sys.stderr,
        )
        return 1
    except (FileNotFoundError, SecurityError) as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"fedserver: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    head = f"{status['status']}: {status['rounds_completed']}/{status['total_rounds']} rounds"
    if args.server:
        print(
            f"{head}, round {status['current_round']}: {status['updates_received']}/"
            f"{status['updates_expected']} updates, {status['live_clients']} live client(s)"
        )
    else:
        print(
            f"{head}, task {status['task']}, strategy {status['strategy']}, "
            f"{status['clients']} client(s)"
        )
    if status.get("failure"):
        print(f"gave up: {status['failure']}")
    last = status["rounds"][-1]["metrics"] if status["rounds"] else {}
    if "epsilon" in last:
        print(
            f"privacy: (epsilon {last['epsilon']:.4g}, delta {last['dp_delta']:g})-DP after "
            f"{status['rounds_completed']} rounds (client-level, Opacus RDP accountant)"
        )
    for line in round_table(status["rounds"]):
        print(line)
    return 0


def round_table(rounds: Sequence[dict[str, Any]]) -> list[str]:
    """One row per round under a header, every column right-aligned to its widest cell; a
    metric a round lacks (evaluation every K rounds, DP) shows as '-'."""
    if not rounds:
        return []
    names = sorted({name for r in rounds for name in r["metrics"]})
    # A simulated fleet's rounds (simulate --fleet) show both clocks: host and fleet seconds.
    fleet = any("fleet_seconds" in r for r in rounds)
    times = ["host s", "fleet s", "fleet time"] if fleet else []
    rows = [["round", "clients", *times, *names]]
    for r in rounds:
        metrics = r["metrics"]
        cells = [f"{metrics[n]:.4g}" if n in metrics else "-" for n in names]
        if fleet:
            keys = ("duration_seconds", "fleet_seconds", "fleet_time")
            cells = [f"{r[k]:.1f}" if k in r else "-" for k in keys] + cells
        rows.append([str(r["round"]), str(r["participants"]), *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def _keygen(args: argparse.Namespace) -> int:
    path = args.keyfile
    try:
        key_id = generate_key_file(path, overwrite=args.force)
    except KeyExists as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ManifestError, OSError) as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    print(f"wrote key {key_id} to {path}; keep a copy: without it the state cannot be read")
    return 0


def _he_keygen(args: argparse.Namespace) -> int:
    from fedcore.he import HEError, generate_keys  # TenSEAL is optional: import on demand

    try:
        secret, public = generate_keys(args.out_dir, overwrite=args.force)
    except FileExistsError as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (HEError, OSError) as e:
        print(f"fedserver: {e}", file=sys.stderr)
        return 1
    print(f"wrote {secret} (clients only) and {public} (coordinator)")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.decrypt != (args.key is not None):
        print("fedserver: --decrypt and --key KEYFILE go together", file=sys.stderr)
        return EXIT_USAGE
    try:
        cipher = StateCipher.from_key_file(args.key) if args.key else None
        round_number, version = export_model(args.state_dir, args.out, cipher, args.round)
    except (ManifestError, ValueError, OSError) as e:
        print(f"fedserver: export failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote round {round_number} model {version[:12]} to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_layered(build_parser(), argv, "server")
    return quiet_broken_pipe(lambda: int(args.handler(args)))


if __name__ == "__main__":
    sys.exit(main())
