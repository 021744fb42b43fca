"""examples/multihost.py: its private LAN of network namespaces, and its refusal without root.

The full demo (`make demo-multihost`) takes about a minute; here only the namespace plumbing is
exercised, which is what can break on another machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from examples import multihost

pytestmark = pytest.mark.timeout(60)


def test_without_root_it_says_why_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert multihost.main(["--dir", "/nonexistent/never-created"]) == 2
    assert "need root" in capsys.readouterr().err


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)
def test_lan_gives_each_host_its_address_and_is_removed() -> None:
    tag = f"fgt{os.getpid()}"
    with multihost.Lan(tag) as lan:
        ns = lan.add_host("a", "10.77.0.21")
        addrs = subprocess.run(
            ["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "10.77.0.21/24" in addrs
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in left
