"""`fedserver certs` and `fedserver tokens`: make credentials for a federation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedserver.security.bundles import parse_owner, write_bundles
from fedserver.security.certs import OPERATOR_NAME, CertPlan, client_names, make_certs
from fedserver.security.tokens import (
    ROLES,
    TokenFileError,
    add_token,
    list_tokens,
    revoke_token,
)

TOKEN_FILE = "tokens.json"


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    certs = sub.add_parser(
        "certs",
        help="create a CA, the coordinator's certificate and one per client (mTLS)",
        description="Write ca.crt/ca.key, server.crt/key, CLIENT.crt/key per client and "
        "operator.crt/key (for `fedserver status --server` and health probes) into --out. "
        "Existing files are kept (re-run with more --clients to add some); --force remakes all. "
        "Keep ca.key off the machines that only run clients.",
    )
    certs.add_argument("--config", type=Path, help="TOML file with a [server] table")
    certs.add_argument("--out", type=Path, required=True, help="folder for the PEM files")
    certs.add_argument(
        "--server-name",
        action="append",
        required=True,
        help="DNS name or IP clients use to reach the coordinator (repeatable; all become SANs)",
    )
    certs.add_argument("--clients", type=int, default=0, help="client certificates to make (0)")
    certs.add_argument(
        "--client-prefix", default="client-", help="client ids are PREFIX0..PREFIX{N-1} (client-)"
    )
    certs.add_argument("--force", action="store_true", help="replace existing CA and certificates")
    certs.add_argument(
        "--bundles",
        type=Path,
        help="also write DIR/NAME/ with ca.crt, NAME.crt and NAME.key for server, operator and "
        "each client: the one folder each machine gets (no CA key, no other identity's key)",
    )
    certs.add_argument(
        "--owner",
        metavar="UID[:GID]",
        help="chown the --bundles folders to this user (as root, e.g. into container volumes)",
    )
    certs.set_defaults(handler=_certs)

    tokens = sub.add_parser(
        "tokens",
        help="manage per-client bearer tokens (stored hashed)",
        description="Tokens are printed once and stored only as SHA-256 hashes. Pass the file to "
        "`fedserver run --tokens FILE`; changes apply to a running coordinator at once.",
    )
    tokens.add_argument("action", choices=["add", "revoke", "list"])
    tokens.add_argument("name", nargs="?", help="client id (add, revoke)")
    tokens.add_argument("--config", type=Path, help="TOML file with a [server] table")
    tokens.add_argument("--state-dir", type=Path, default=Path("state"), help="(./state)")
    tokens.add_argument("--file", type=Path, help=f"token file (STATE_DIR/{TOKEN_FILE})")
    tokens.add_argument(
        "--role",
        default="client",
        choices=ROLES,
        help="client: may train as NAME; operator: may only read status (client)",
    )
    tokens.set_defaults(handler=_tokens)


def _certs(args: argparse.Namespace) -> int:
    if args.clients < 0:
        print("fedserver certs: --clients must be >= 0", file=sys.stderr)
        return 2
    if args.owner and not args.bundles:
        print("fedserver certs: --owner applies to --bundles only", file=sys.stderr)
        return 2
    clients = client_names(args.clients, args.client_prefix)
    plan = CertPlan(args.out, args.server_name, clients)
    plan.force = args.force
    try:
        owner = parse_owner(args.owner) if args.owner else None
        written = make_certs(plan)
    except ValueError as e:
        print(f"fedserver certs: {e}", file=sys.stderr)
        return 2
    kept = "nothing new" if not written else f"wrote {len(written)} file(s)"
    print(f"fedserver certs: {kept} in {args.out}")
    for path in written:
        print(f"  {path}")
    if args.bundles:
        try:
            folders = write_bundles(
                args.out, args.bundles, ["server", OPERATOR_NAME, *clients], owner
            )
        except OSError as e:
            print(f"fedserver certs: --bundles {args.bundles}: {e}", file=sys.stderr)
            return 1
        print(f"fedserver certs: one folder per identity in {args.bundles}:")
        print("  " + " ".join(f.name for f in folders))
    return 0


def _tokens(args: argparse.Namespace) -> int:
    path = args.file or args.state_dir / TOKEN_FILE
    try:
        if args.action == "list":
            for e in list_tokens(path):
                print(f"{e.name}\t{e.role}\tsha256:{e.sha256[:12]}…")
            return 0
        if not args.name:
            print(f"fedserver tokens {args.action}: NAME is required", file=sys.stderr)
            return 2
        if args.action == "add":
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # often the state dir
            print(add_token(path, args.name, args.role))
            print(
                f"fedserver tokens: token for {args.name!r} ({args.role}) stored hashed in {path}; "
                "it is shown only now",
                file=sys.stderr,
            )
            return 0
        if not revoke_token(path, args.name):
            print(f"fedserver tokens: no token named {args.name!r} in {path}", file=sys.stderr)
            return 1
        return 0
    except TokenFileError as e:
        print(f"fedserver tokens: {e}", file=sys.stderr)
        return 2
