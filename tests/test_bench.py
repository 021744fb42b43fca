"""The round-overhead benchmark runs, and the coordinator's memory stays O(model) while it does.

Both start a real coordinator and real bench clients (bench/client.py) over loopback gRPC.
Timings are only printed, never asserted: the machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.round_overhead import memory_budget, run_cell
from tests.procs import REPO, child_env

pytestmark = [pytest.mark.integration]


@pytest.mark.timeout(120)
def test_quick_bench_writes_a_table_and_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.round_overhead", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ratio" in out.stdout
    (result,) = tmp_path.glob("round_overhead-*.json")
    data = json.loads(result.read_text())
    assert data["machine"]["nproc"] >= 1
    (cell,) = data["cells"]
    assert (cell["clients"], cell["params"], cell["rounds"]) == (2, 1_000_000, 2)
    # Every round each client pulls the model and pushes an fp32 delta of the same size.
    assert cell["wire_bytes_per_round"] == 2 * 2 * 4_000_000
    assert cell["round_seconds"] > 0 and cell["floor_seconds"] > 0
    assert cell["peak_rss_bytes"] <= cell["memory_budget_bytes"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_coordinator_peak_rss_is_bounded_by_model_size(tmp_path: Path) -> None:
    """8 clients, 10M float32 parameters (40 MB): peak RSS <= 4 x model + 200 MB = 360 MB."""
    params = 10_000_000
    cell = run_cell(8, params, 2, tmp_path)
    assert cell["wire_bytes_per_round"] == 8 * 2 * params * 4
    peak, budget = cell["peak_rss_bytes"], memory_budget(params * 4)
    print(f"coordinator peak RSS {peak / 1e6:.0f} MB, budget {budget / 1e6:.0f} MB")
    assert peak <= budget


@pytest.mark.timeout(120)
def test_codec_error_bench_measures_error_bytes_and_memory(tmp_path: Path) -> None:
    command = ["-m", "bench.codec_error", "--params", "3000000", "--encodings", "int8", "int4"]
    out = subprocess.run(
        [sys.executable, *command, "--rounds", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (result,) = tmp_path.glob("codec_error-*.json")
    rows = {r["encoding"]: r for r in json.loads(result.read_text())["rows"]}
    assert list(rows) == ["fp32", "int8", "int4"]  # the baseline first
    assert rows["fp32"]["round1_relative_error"] == 0 and rows["fp32"]["bytes_vs_fp32"] == 1
    assert rows["int4"]["update_bytes"] == 4 * 3_000_000 // 64 + 3_000_000 // 2
    # int8's error stays what one round loses; int4's error feedback shrinks it over rounds.
    assert 0.005 < rows["int8"]["round1_relative_error"] < 0.03
    assert 0.05 < rows["int4"]["round1_relative_error"] < 0.2
    assert rows["int4"]["cumulative_relative_error"] < 0.8 * rows["int4"]["round1_relative_error"]
    assert rows["int4"]["peak_above_delta_models"] > 1  # the residual it carries
