"""`fedserver certs --bundles`: each identity's folder holds ca.crt and its own pair only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedserver.cli import main as fedserver_main

STEMS = ("server", "operator", "client-0", "client-1")


def _certs(tmp_path: Path, *extra: str) -> int:
    return fedserver_main(
        ["certs", "--out", str(tmp_path / "all"), "--server-name", "coord", "--clients", "2",
         *extra]
    )  # fmt: skip


@pytest.mark.usefixtures("open_umask")
def test_each_bundle_holds_ca_crt_and_its_own_pair_only(tmp_path: Path) -> None:
    owner = f"{os.getuid()}:{os.getgid()}"
    assert _certs(tmp_path, "--bundles", str(tmp_path / "b"), "--owner", owner) == 0
    out = tmp_path / "all"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(STEMS)
    for stem in STEMS:
        folder = tmp_path / "b" / stem
        files = {p.name: p for p in folder.iterdir()}
        assert set(files) == {"ca.crt", f"{stem}.crt", f"{stem}.key"}, stem
        for name, path in files.items():
            assert path.read_bytes() == (out / name).read_bytes(), (stem, name)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(files[f"{stem}.key"].stat().st_mode) == 0o600
        assert stat.S_IMODE(files["ca.crt"].stat().st_mode) == 0o644


def test_bundles_follow_a_forced_remake(tmp_path: Path) -> None:
    bundles = tmp_path / "b"
    assert _certs(tmp_path, "--bundles", str(bundles)) == 0
    old = (bundles / "client-0" / "client-0.key").read_bytes()
    assert _certs(tmp_path, "--bundles", str(bundles), "--force") == 0
    new = (bundles / "client-0" / "client-0.key").read_bytes()
    assert new != old and new == (tmp_path / "all" / "client-0.key").read_bytes()
    assert (bundles / "client-0" / "ca.crt").read_bytes() == (tmp_path / "all/ca.crt").read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--owner", "10001"], "--owner applies to --bundles only"),
        (["--bundles", "B", "--owner", "fed"], "expected UID[:GID], numbers"),
    ],
)
def test_owner_is_checked_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    extra = [str(tmp_path / w) if w == "B" else w for w in extra]
    assert _certs(tmp_path, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "all").exists()
