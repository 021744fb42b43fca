"""bench/large_model.py: fedgrpc's large-model bench and its NVFlare side by side.

The quick run starts a real coordinator and real `fedclient` processes (a no-train torch Task)
over loopback gRPC. NVFlare lives in its own venv (.venv-nvflare, `make nvflare-venv`): the
side-by-side test is skipped where it is absent, and without it the bench says how to install it
and still runs fedgrpc's side. Timings and memory are printed by the bench, never asserted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.large_model import needed_bytes, repeat_medians
from bench.large_nvflare import find_nvflare, nvflare_rounds
from tests.procs import run_module

pytestmark = [pytest.mark.integration]

QUICK = (2, 2_000_000, 2)  # clients, params, rounds of --quick
FEDGRPC_KEYS = {
    "round_seconds",
    "round_seconds_all",
    "floor_seconds",
    "ratio_to_floor",
    "coordinator_peak_bytes",
    "coordinator_budget_bytes",
    "client_peak_bytes",
    "client_peaks_bytes",
    "client_budget_bytes",
    "model_bytes",
}


def only_result(folder: Path) -> dict[str, Any]:
    (result,) = folder.glob("large_model-*.json")
    return dict(json.loads(result.read_text()))


def check_cell(cell: dict[str, Any], system: str, measured_clients: int = QUICK[0]) -> None:
    assert cell["system"] == system
    assert (cell["clients"], cell["params"], cell["rounds"]) == QUICK
    assert cell["model_bytes"] == QUICK[1] * 4
    assert len(cell["round_seconds_all"]) == QUICK[2]
    assert len(cell["client_peaks_bytes"]) == measured_clients
    assert cell["round_seconds"] > 0 and cell["floor_seconds"] > 0
    assert cell["coordinator_peak_bytes"] > 0 and cell["client_peak_bytes"] > 0


@pytest.mark.timeout(240)
def test_quick_without_nvflare_runs_fedgrpc_and_says_how_to_install_it(tmp_path: Path) -> None:
    """Two fedclients with the no-train Task, then one of them beside one bench.client."""
    out = run_module(
        "bench.large_model",
        "--quick",
        "--fedclients",
        "2",
        "1",
        "--out",
        str(tmp_path),
        "--nvflare-python",
        str(tmp_path / "no-python"),
        timeout=230,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "make nvflare-venv" in out.stderr
    assert "ratio" in out.stdout
    data = only_result(tmp_path)
    assert data["nvflare_version"] is None and data["skipped"] == [] and data["verdicts"] == []
    assert data["repeat_medians"] == []  # each system ran once
    both, mixed = data["cells"]
    check_cell(both, "fedgrpc")
    check_cell(mixed, "fedgrpc-1-bench", measured_clients=1)
    assert (both["fedclients"], mixed["fedclients"]) == (2, 1)
    for cell in (both, mixed):
        assert FEDGRPC_KEYS <= cell.keys()
        # Each run has its floor for the same bytes: N models down, N deltas up, N added.
        assert cell["down_seconds"] > 0 and cell["up_seconds"] > 0


@pytest.mark.timeout(60)
def test_a_size_the_machine_cannot_hold_is_skipped_not_run(tmp_path: Path) -> None:
    params = 1_000_000_000_000  # 4 TB of float32
    out = run_module(
        "bench.large_model", "--params", str(params), "--nvflare-params", "--out", str(tmp_path),
        timeout=50,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--force runs it anyway" in out.stdout
    data = only_result(tmp_path)
    assert data["cells"] == []
    (skipped,) = data["skipped"]
    assert (skipped["system"], skipped["params"]) == ("fedgrpc", params)
    assert skipped["needed_bytes"] == needed_bytes("fedgrpc", params, clients=3, fedclients=3)


def test_repeated_runs_report_the_median_ratio_and_the_largest_peaks() -> None:
    """--repeat: each run has its own floor; the median of the ratios, and every bound checked
    against the worst run."""

    def run(ratio: float, peak: int, system: str = "fedgrpc-3-bench") -> dict[str, Any]:
        return {
            "system": system, "params": 600_000_000, "fedclients": 0, "round_seconds": 10 * ratio,
            "ratio_to_floor": ratio, "coordinator_peak_bytes": peak, "client_peak_bytes": None,
        }  # fmt: skip

    nvflare = {"system": "nvflare-streaming", "params": 600_000_000, "ratio_to_floor": 9.0}
    once = run(2.0, 1, system="fedgrpc")
    (median,) = repeat_medians([run(1.4, 5), nvflare, run(1.2, 7), once, run(1.25, 6)])
    assert (median["system"], median["runs"]) == ("fedgrpc-3-bench", 3)
    assert median["ratio_to_floor_median"] == 1.25 and median["ratios_to_floor"] == [1.4, 1.2, 1.25]
    assert median["coordinator_peak_bytes_max"] == 7 and median["client_peak_bytes_max"] is None
    assert "median of 3 runs" in median["line"] and "ratio 1.25 x floor" in median["line"]


def test_nvflare_rounds_are_read_between_the_servers_round_banners() -> None:
    log = "\n".join(
        [
            "2026-12-07 01:19:30,000 - INFO - Start FedAvg.",
            "2026-12-07 01:19:34,372 - INFO - ",
            "-----",
            "                                Round 0 started.                                ",
            "2026-12-07 01:19:40,000 - INFO - Aggregated 1/3 results",
            "2026-12-07 01:19:42,399 - INFO - ",
            "                                Round 1 started.                                ",
            "2026-12-07 01:19:45,899 - INFO - ",
            "                                Finished FedAvg.                                ",
        ]
    )
    assert nvflare_rounds(log) == pytest.approx([8.027, 3.5])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(find_nvflare() is None, reason="NVFlare not installed (make nvflare-venv)")
def test_quick_side_by_side_runs_nvflare_with_and_without_streaming(tmp_path: Path) -> None:
    out = run_module("bench.large_model", "--quick", "--out", str(tmp_path), timeout=880)
    assert out.returncode == 0, out.stdout + out.stderr
    data = only_result(tmp_path)
    assert data["nvflare_failures"] == []
    assert data["nvflare_version"] == "2.9.0"
    systems = [c["system"] for c in data["cells"]]
    assert systems == ["fedgrpc", "nvflare-streaming", "nvflare-no-streaming"]
    for cell in data["cells"]:
        check_cell(cell, cell["system"])
    for cell in data["cells"][1:]:
        # The server side is the simulator's processes; its clients are simulator_worker ones.
        names = cell["processes"]
        assert sum("simulator_worker" in n for n in names) == QUICK[0], names
    assert len(data["verdicts"]) == 2 and all("faster" in v for v in data["verdicts"])
