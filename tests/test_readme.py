"""The README's commands work when pasted into a fresh shell after `make demo`, and the checkout
keeps what those commands write (certificates with the CA's key, reports) out of git."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest

from tests.procs import REPO

ACTIVATE = ". .venv/bin/activate"
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(fedserver|fedclient)\b")


def _bash_blocks(text: str) -> list[list[str]]:
    return [block.splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_commands_find_fedserver_and_fedclient() -> None:
    """`make demo` installs into .venv/, which a fresh shell does not have on its PATH: every
    block with a bare `fedserver`/`fedclient` command activates it first."""
    bare = []
    for block in _bash_blocks((REPO / "README.md").read_text()):
        activated = False
        for line in block:
            activated = activated or line.startswith(ACTIVATE)
            if COMMAND.match(line) and not activated:
                bare.append(line)
    assert bare == []


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("path", ["certs/ca.key", "report/rounds.csv", "sim-state/state.db"])
def test_what_readme_commands_write_is_ignored_by_git(path: str) -> None:
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=REPO, capture_output=True
    )
    assert out.returncode == 0, f"{path} is not ignored"


def test_license_is_an_spdx_expression() -> None:
    """The table form prints setuptools' deprecation banner at every install; the string
    form needs setuptools 77."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
