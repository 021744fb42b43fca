"""Reading docker-compose.yml (and its plaintext override) the way Compose would, without Docker.

Commands and healthchecks are parsed by the same argparse parsers the console scripts use.
"""

from __future__ import annotations

import argparse
import copy
import shlex
from pathlib import Path
from typing import Any

import yaml

from fedclient import cli as client_cli
from fedserver import cli as server_cli

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
PLAINTEXT = REPO / "docker-compose.plaintext.yml"
INIT, COORDINATOR = "certs", "coordinator"
CLIENTS = ("client-0", "client-1", "client-2")
PARSERS = {"fedserver": server_cli.build_parser, "fedclient": client_cli.build_parser}


def load(*files: Path) -> dict[str, Any]:
    """Compose's merge for what these files use: later files replace a service's keys."""
    merged: dict[str, Any] = {}
    for path in files:
        data = yaml.safe_load(path.read_text())
        if not merged:
            merged = copy.deepcopy(data)
            continue
        for name, override in (data.get("services") or {}).items():
            service = merged["services"].setdefault(name, {})
            for key, value in override.items():
                if isinstance(value, dict) and isinstance(service.get(key), dict):
                    service[key] = {**service[key], **value}
                else:
                    service[key] = value
    return merged


def argv_of(command: str | list[Any]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def command(service: dict[str, Any]) -> list[str]:
    return argv_of(service["command"])


def healthcheck(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    assert test[0] == "CMD", f"unexpected healthcheck form {test[0]!r}"
    return [str(a) for a in test[1:]]


def parse(argv: list[str], where: str) -> argparse.Namespace:
    """Parse like the console script would; fails the test with the service name."""
    import pytest

    assert argv[0] in PARSERS, f"{where}: command must start with one of {sorted(PARSERS)}"
    try:
        return PARSERS[argv[0]]().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: {argv[0]} rejects {shlex.join(argv[1:])!r}")


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str | None, bool]]:
    """target -> (kind, source, read_only)."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out[volume["target"]] = (
                volume.get("type", "volume"),
                volume.get("source"),
                bool(volume.get("read_only", False)),
            )
        else:
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out[target] = (kind, source, len(parts) > 2 and "ro" in parts[2].split(","))
    return out
