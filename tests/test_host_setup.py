"""docker/host-setup.sh (the `make docker-e2e` host preparation), read and run without Docker.

It must leave the host's own Docker daemon alone (the test gets a daemon of its own: socket,
data root, exec root, pid file, containerd namespace, no shared bridge; the test reaches it
through DOCKER_HOST), and debootstrap must use this host's Debian mirror (from its apt sources)
or debootstrap's default: the script names no host.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.compose_files import REPO

SCRIPT = REPO / "docker" / "host-setup.sh"
MAKEFILE = REPO / "Makefile"


def _text() -> str:
    return SCRIPT.read_text()


def _code() -> str:
    """The script without its comments (a `#` inside quotes is not one here)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in _text().splitlines())


MIRROR_ONLY = '\nif [ "${1:-}" = "--mirror" ]; then'


def _mirror(apt: Path) -> str:
    """What `host-setup.sh --mirror` prints, running only the script's settings and functions
    (everything above its --mirror branch): a test must never install packages or start a
    daemon, whatever the script does further down."""
    text = _text()
    assert MIRROR_ONLY in text, "host-setup.sh has no --mirror branch"
    head = text[: text.index(MIRROR_ONLY)]
    assert not re.search(r"^\s*(apt-get|dockerd|docker|debootstrap)\b", head, re.M)
    done = subprocess.run(
        ["sh", "-c", head + "\nhost_mirror\n", str(SCRIPT)],
        env={"PATH": "/usr/bin:/bin", "FEDGRPC_APT_DIR": str(apt)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_script_names_no_host() -> None:
    assert not re.findall(r"\b(?:https?|ftp)://[^\s\"'$]+", _code()), "a hard-coded mirror URL"
    assert "deb.debian.org" not in _text()


@pytest.mark.parametrize(
    ("files", "mirror"),
    [
        (  # one-line sources: options skipped, security and other distributions passed over
            {
                "sources.list": "# deb http://old/debian bookworm main\n"
                "deb http://archive.ubuntu.example/ubuntu jammy main\n"
                "deb http://mirror.local/debian-security bookworm-security main\n"
                "deb-src http://src.local/debian bookworm main\n"
                "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] "
                "http://mirror.local/debian bookworm main contrib\n"
            },
            "http://mirror.local/debian",
        ),
        (  # deb822 (Debian 12's default form), behind an apt proxy
            {
                "sources.list.d/debian.sources": "Types: deb\n"
                "URIs: http://apt-cache:3142/security.debian.example/debian-security\n"
                "Suites: trixie-security\nComponents: main\n\n"
                "Types: deb deb-src\nURIs: http://apt-cache:3142/debian\n"
                "Suites: trixie trixie-updates\nComponents: main\n"
            },
            "http://apt-cache:3142/debian",
        ),
        (  # a disabled stanza is no source; a file: mirror is one
            {
                "sources.list.d/a.sources": "Types: deb\nURIs: http://off/debian\n"
                "Suites: bookworm\nEnabled: no\n",
                "sources.list.d/b.list": "deb file:/srv/mirror/debian stable main\n",
            },
            "file:/srv/mirror/debian",
        ),
        ({}, ""),  # nothing to go by: debootstrap's own default
        ({"sources.list": "deb http://archive.ubuntu.example/ubuntu noble main\n"}, ""),
    ],
)
def test_debootstrap_uses_this_hosts_debian_mirror(
    tmp_path: Path, files: dict[str, str], mirror: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _mirror(tmp_path) == mirror
    debootstrap = [line for line in _code().splitlines() if "bookworm" in line and "$root" in line]
    assert debootstrap and "$mirror" in debootstrap[0], "debootstrap is not given the mirror"


def _dockerd_argv() -> list[str]:
    code = _code().replace("\\\n", " ")
    line = next(ln for ln in code.splitlines() if re.search(r"\bdockerd\s+--", ln))
    argv = shlex.split(line[line.index("dockerd") :].split(">")[0])
    return argv


def test_the_test_gets_a_docker_daemon_of_its_own() -> None:
    argv = _dockerd_argv()
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    own = {"--host", "--data-root", "--exec-root", "--pidfile", "--containerd-namespace"}
    assert own <= flags, f"dockerd shares {sorted(own - flags)} with the host's daemon"
    assert argv[argv.index("--bridge") + 1] == "none", "docker0 belongs to the host's daemon"
    assert "--iptables=false" in argv
    for shared in ("/var/run/docker.sock", "/var/lib/docker", "/var/run/docker.pid"):
        assert shared not in _code(), f"{shared} is the host daemon's"
    # Nothing that would stop, restart or reconfigure a daemon the host runs.
    assert not re.search(r"\b(systemctl|service|pkill|killall|pgrep)\b", _code())
    assert re.search(r"DOCKER_HOST=\$\{FEDGRPC_DOCKER_HOST:-unix://", _code())
    assert "export DOCKER_HOST" in _code()


def test_make_docker_e2e_points_the_test_at_that_daemon() -> None:
    text = MAKEFILE.read_text().replace("\\\n", " ")
    recipe = text[text.index("docker-e2e:") :].split("\n\n")[0]
    host = re.search(r"^DOCKER_E2E_HOST \?= (\S+)$", text, re.M)
    assert host is not None and host[1].startswith("unix://")
    assert "FEDGRPC_DOCKER_HOST=$(DOCKER_E2E_HOST)" in recipe and "host-setup.sh" in recipe
    assert "DOCKER_HOST=$(DOCKER_E2E_HOST)" in recipe.split("host-setup.sh")[1]
    run_dir = re.search(r"RUN_DIR=\$\{FEDGRPC_DOCKER_RUN:-([^}]+)\}", _code())
    assert run_dir is not None and host[1] == f"unix://{run_dir[1]}/docker.sock"
