"""bench/compare_flower.py: fedgrpc against Flower 1.41 with real processes on both sides.

Flower lives in its own venv (.venv-flower, `make flower-venv`; its protobuf pin conflicts with
ours), so the comparison test is skipped where that venv is absent; nothing here needs flwr to
pass. Timings are printed by the benchmark, never asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compare_flower import find_flower
from tests.procs import run_module

pytestmark = [pytest.mark.integration]


@pytest.mark.timeout(60)
def test_without_flower_it_says_how_to_install_it_and_exits_2(tmp_path: Path) -> None:
    out = run_module(
        "bench.compare_flower",
        "--quick",
        "--flower-python",
        str(tmp_path / "no-python"),
        timeout=50,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "make bench-flower" in out.stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(find_flower() is None, reason="Flower not installed (make flower-venv)")
def test_quick_comparison_runs_both_flower_paths(tmp_path: Path) -> None:
    out = run_module("bench.compare_flower", "--quick", "--out", str(tmp_path), timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    (result,) = tmp_path.glob("compare_flower-*.json")
    cells = json.loads(result.read_text())["cells"]
    assert [c["system"] for c in cells] == ["fedgrpc", "flower-superlink", "flower-legacy"]
    for cell in cells:
        assert (cell["clients"], cell["params"], cell["rounds"]) == (2, 100_000, 2)
        assert cell["round_seconds"] > 0 and cell["coordinator_peak_bytes"] > 0
    superlink = cells[1]["coordinator_processes"]
    # The ServerApp runs two processes below the SuperLink; its memory counts as the coordinator's.
    assert any(name.startswith("flwr-serverapp") for name in superlink), superlink
