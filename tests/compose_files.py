"""Reading docker-compose.yml (and its plaintext override) the way Compose would, without Docker.

Commands and healthchecks are parsed by the same argparse parsers the console scripts use.
"""

from __future__ import annotations

import argparse
import copy
import os
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


def local_init(argv: list[str]) -> list[str]:
    """The init service's argv for this machine: its bundles go to this user, not uid 10001.

    Docker's part (running the service as root so it may chown) is all that changes.
    """
    out = list(argv)
    if "--owner" in out:
        out[out.index("--owner") + 1] = f"{os.getuid()}:{os.getgid()}"
    return out


class Containers:
    """Each service's filesystem as a folder under root, its named volumes as symlinks.

    root/volumes/NAME is one folder per named volume, shared by every service that mounts it;
    root/containers/SERVICE/TARGET links to it. A path in a service's command becomes the same
    path under that service's folder, so a file lands in (and is read from) the volume Docker
    would use, and a service sees nothing it does not mount.
    """

    def __init__(self, root: Path, services: dict[str, dict[str, Any]]) -> None:
        self.root = root
        self.targets: dict[str, list[str]] = {}
        for name, service in services.items():
            self.targets[name] = []
            for target, (kind, source, _ro) in mounts(service).items():
                assert kind == "volume" and source, f"{name}: {target} is a {kind} mount"
                volume = self.volume(source)
                volume.mkdir(parents=True, exist_ok=True)
                link = self.path(name, target)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(volume, target_is_directory=True)
                self.targets[name].append(target)

    def volume(self, name: str) -> Path:
        return self.root / "volumes" / name

    def path(self, service: str, container_path: str) -> Path:
        return self.root / "containers" / service / container_path.lstrip("/")

    def localize(self, service: str, argv: list[str]) -> list[str]:
        """Rewrite every argument that is a path into (or above) one of the service's mounts."""
        out = []
        for word in argv:
            for target in self.targets[service]:
                if word == target or word.startswith(target + "/") or target.startswith(word + "/"):
                    word = str(self.path(service, word))
                    break
            out.append(word)
        return out

    def visible_files(self, service: str) -> set[str]:
        """Names of the files in every volume the service mounts."""
        return {
            path.name
            for target in self.targets[service]
            for path in self.path(service, target).resolve().rglob("*")
            if path.is_file()
        }


def networks(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Network name -> its per-service settings (aliases, ...), as Compose reads `networks:`;
    a service with neither `networks` nor `network_mode` is on the project's `default`."""
    if "network_mode" in service:
        return {}
    given = service.get("networks", ["default"])
    if isinstance(given, list):
        return {name: {} for name in given}
    return {name: settings or {} for name, settings in given.items()}


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
