"""`fedserver simulate`: virtual clients against the real coordinator, on the embedded engine
(the default) and on a local Ray instance (--engine ray).

Every run is a real `fedserver simulate` process; a Ray one has its own small Ray instance (2
workers at most, 80 MiB object store, no dashboard) in a short temp dir of its own, so a test
can check that no Ray process outlives it (the Ray flags are ignored by the embedded engine).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedserver.cli import build_parser
from fedserver.simulation.settings import parse_resources
from tests.procs import (
    Proc,
    fedserver,
    free_port,
    spawn,
    start_clients,
    start_serving,
    status_json,
    wait_finished,
    wait_until,
)

DIGITS = "examples.digits:task"
# Synthetic with one W, b for all devices, inputs (B_k ~ N(0, 0.5)) and sizes non-IID: on the
# held-out set (test splits of devices 0-199) chance is 0.10 and the majority class 0.28.
# Measured, 10 rounds of 50 of 1,000 clients: accuracy 0.54 after round 1, 0.61 after round 10.
# (Synthetic(0.5, 0.5) proper learns a few points a round from 0.10: docs/simulation.md.)
SYNTHETIC_LEARNABLE = "examples.synthetic:synthetic_iid_05"
MAJORITY_CLASS = 0.28


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    """A short path (Ray's socket paths must stay under 107 bytes); checked empty of Ray
    processes afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield path
    try:
        wait_until(lambda: not _ray_processes(path), 60, f"Ray processes under {path} to exit")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _ray_processes(path: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True)
    return out.stdout.split()


def _sim_args(state: Path, ray_dir: Path, task: str, *extra: str) -> list[str]:
    return [
        "simulate",
        "--task",
        task,
        "--state-dir",
        str(state),
        "--ray-temp-dir",
        str(ray_dir),
        "--object-store-mb",
        "80",
        *extra,
    ]


# A run here needs 15-25 s of wall time with the 2 cores shared by 15-25 runnable processes
# (measured: Ray start 4-9 s, W actors 2-5 s, 10 rounds of 50 clients 4-6 s, shutdown 1.5 s),
# so 170 s covers far more than a second CPU-bound process beside the suite. A run that still
# overruns it is stuck, not slow: say where, from its log, instead of only "timed out".
SIMULATE_BUDGET = 170.0


def _simulate(state: Path, ray_dir: Path, task: str, *extra: str) -> None:
    try:
        out = fedserver(*_sim_args(state, ray_dir, task, *extra), timeout=SIMULATE_BUDGET)
    except subprocess.TimeoutExpired as e:
        log = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise AssertionError(
            f"fedserver simulate still running after {SIMULATE_BUDGET:.0f}s; its log ends:\n"
            f"{(log or '(nothing logged)')[-4000:]}"
        ) from None
    assert out.returncode == 0, out.stderr[-4000:]


# ---------------------------------------------------------------------------- flags (fast)
def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]  # type: ignore[no-any-return]


def test_simulate_takes_runs_own_flag_definitions() -> None:
    run, sim = _subcommand("run"), _subcommand("simulate")
    run_flags = {s: a for a in run._actions for s in a.option_strings}
    sim_flags = {s: a for a in sim._actions for s in a.option_strings}
    for flag in ("--strategy", "--proximal-mu", "--dp-clip", "--dp-noise-multiplier",
                 "--train-tensors", "--eval-every", "--fraction-evaluate", "--mode",
                 "--clients-per-round", "--rounds", "--seed", "--encrypt-state"):  # fmt: skip
        assert sim_flags[flag].help == run_flags[flag].help, flag
        assert sim_flags[flag].default == run_flags[flag].default, flag
        assert sim_flags[flag].choices == run_flags[flag].choices, flag
    for flag in ("--port", "--host", "--tls-cert", "--tokens", "--secure", "--linger"):
        assert flag in run_flags and flag not in sim_flags, flag
    for flag in ("--clients", "--ray-address", "--client-resources", "--partitioner",
                 "--alpha", "--encoding", "--workers", "--engine"):  # fmt: skip
        assert flag in sim_flags, flag


def test_client_resources_parse() -> None:
    assert parse_resources("cpus=1,gpus=0") == (1.0, 0.0)
    assert parse_resources("cpus=0.5") == (0.5, 0.0)
    assert parse_resources("gpus=1") == (1.0, 1.0)
    for bad in ("cpu=1", "cpus=0", "cpus=x", "gpus=-1", "cpus"):
        with pytest.raises(ValueError, match="client-resources"):
            parse_resources(bad)


def test_too_few_clients_is_a_usage_error_before_ray(tmp_path: Path, ray_dir: Path) -> None:
    out = fedserver(
        *_sim_args(tmp_path / "s", ray_dir, DIGITS, "--clients", "2", "--min-clients", "3")
    )
    assert out.returncode == 2
    assert "--clients 2 is below --min-clients 3" in out.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_mode_runs_the_same_on_any_number_of_workers(tmp_path: Path, ray_dir: Path) -> None:
    """--mode async once waited forever (asynchronous rounds select nobody): now waves of
    --max-concurrency clients pull each version; with 4 pulling and buffers of 2, every other
    buffer takes the wave's late half at staleness 1. Same seed, same bytes on 0 and 2 workers."""
    args = ("--clients", "8", "--mode", "async", "--buffer-size", "2", "--max-concurrency", "4")
    args += ("--rounds", "4", "--seed", "5", "--round-timeout", "600")
    models = []
    for workers in ("0", "2"):
        state = tmp_path / f"w{workers}"
        _simulate(state, ray_dir, DIGITS, *args, "--workers", workers)
        status = status_json(state)
        assert status["status"] == "finished"
        assert [r["participants"] for r in status["rounds"]] == [2, 2, 2, 2]
        staleness = [r["metrics"]["staleness_max"] for r in status["rounds"]]
        assert staleness == [0, 1, 0, 1], staleness
        models.append((state / "model.safetensors").read_bytes())
    assert models[0] == models[1]


# ---------------------------------------------------------------------------- runs (slow)
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(420)
def test_digits_simulation_matches_fedclient_processes(
    tmp_path: Path, ray_dir: Path, procs: list[Proc]
) -> None:
    """10 virtual clients x 5 per round == 10 `fedclient` processes, within 1 accuracy point."""
    rounds, common = "3", ("--clients-per-round", "5", "--min-clients", "10", "--seed", "0")
    sim_state = tmp_path / "sim"
    _simulate(sim_state, ray_dir, DIGITS, "--clients", "10", "--rounds", rounds, *common)

    port, real_state = free_port(), tmp_path / "real"
    server = start_serving(procs, tmp_path / "logs", port, real_state, "--rounds", rounds, *common)
    wait_finished(server, start_clients(procs, tmp_path / "logs", port, 10), 300)

    sim, real = status_json(sim_state), status_json(real_state)
    assert sim["status"] == real["status"] == "finished"
    assert [r["participants"] for r in sim["rounds"]] == [5, 5, 5]
    sim_acc = sim["rounds"][-1]["metrics"]["accuracy"]
    real_acc = real["rounds"][-1]["metrics"]["accuracy"]
    assert abs(sim_acc - real_acc) <= 0.01, (sim_acc, real_acc)
    assert sim_acc >= 0.85


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("task", "encoding"),
    [("tests.sim_tasks:personal", ()), (DIGITS, ("--encoding", "topk:0.05"))],
    ids=["fedper", "topk-error-feedback"],
)
def test_stateful_virtual_clients_match_fedclient_processes(
    tmp_path: Path, ray_dir: Path, procs: list[Proc], task: str, encoding: tuple[str, ...]
) -> None:
    """FedPer (the last bias stays on each client and shapes its next update), and top-k's
    error feedback (what a round's top-k left out is added to the next round's delta), 3
    clients x 3 rounds: the simulated federation ends at the deployed one's model (float
    tolerance: a deployment folds updates in arrival order). Both need per-client state
    across rounds, which virtual clients once did not keep."""
    rounds, common = "3", ("--clients-per-round", "3", "--min-clients", "3", "--seed", "0")
    sim_state = tmp_path / "sim"
    _simulate(sim_state, ray_dir, task, "--clients", "3", "--rounds", rounds, *common, *encoding)

    port, real_state = free_port(), tmp_path / "real"
    server = start_serving(
        procs, tmp_path / "logs", port, real_state, "--rounds", rounds, *common, task=task
    )
    clients = start_clients(procs, tmp_path / "logs", port, 3, *encoding, task=task)
    wait_finished(server, clients, 300)

    sim, real = (
        load_file(sim_state / "model.safetensors"),
        load_file(real_state / "model.safetensors"),
    )
    assert sorted(sim) == sorted(real)
    for name in sim:
        np.testing.assert_allclose(sim[name], real[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # Each client's state, on disk between its rounds.
    assert sorted(p.name for p in (sim_state / "virtual-clients").iterdir()) == [
        f"client-{i}.safetensors" for i in range(3)
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_same_seed_same_model_on_every_engine_and_worker_count(
    tmp_path: Path, ray_dir: Path
) -> None:
    """Embedded in-process, 1 and 2 worker processes, and Ray: the same model bytes. The task
    also draws from numpy's and random's global generators while training: they are seeded per
    (seed, client, round) like torch's, not left to each worker's history."""
    models = {}
    for name, flags in {
        "embedded-0": ("--workers", "0"),
        "embedded-1": ("--workers", "1"),
        "embedded-2": ("--workers", "2"),
        "ray-2": ("--workers", "2", "--engine", "ray"),
    }.items():
        state = tmp_path / name
        args = ("--clients", "10", "--clients-per-round", "5", "--rounds", "2", "--seed", "3")
        _simulate(state, ray_dir, "tests.sim_tasks:noisy", *args, *flags)
        models[name] = (state / "model.safetensors").read_bytes()
    assert len(set(models.values())) == 1, {k: hash(v) for k, v in models.items()}


def test_ray_only_flags_are_refused_with_the_embedded_engine(tmp_path: Path) -> None:
    for flags, message in (
        (("--ray-address", "auto", "--engine", "embedded"), "--ray-address names a Ray cluster"),
        (("--workers", "0", "--engine", "ray"), "--workers 0 (in-process) is the embedded"),
    ):
        out = fedserver("simulate", "--task", DIGITS, "--clients", "2",
                        "--state-dir", str(tmp_path / "s"), *flags)  # fmt: skip
        assert out.returncode == 2, (flags, out.stderr[-2000:])
        assert message in out.stderr, (flags, out.stderr[-2000:])
        assert not (tmp_path / "s").exists()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_failing_clients_neither_stall_nor_end_the_run(tmp_path: Path, ray_dir: Path) -> None:
    """Client 1's training and client 2's evaluation raise ValueError every round: each round
    closes on the other 3 updates without waiting out --round-timeout (600 s, far beyond this
    test's timeout), and the run finishes (a client's ValueError once exited 2, a usage error)."""
    state = tmp_path / "state"
    args = ("--clients", "4", "--clients-per-round", "4", "--min-clients", "2", "--rounds", "2")
    args += ("--eval-every", "1", "--round-timeout", "600", "--workers", "1")
    out = fedserver(*_sim_args(state, ray_dir, "tests.sim_tasks:failing", *args), timeout=140)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "virtual client client-1 failed: ValueError" in out.stderr
    assert "virtual client client-2 failed to evaluate round 2: ValueError" in out.stderr
    status = status_json(state)
    assert status["status"] == "finished"
    assert [r["participants"] for r in status["rounds"]] == [3, 3]
    assert [r["metrics"]["fed_clients"] for r in status["rounds"]] == [3, 3]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_thousand_virtual_clients_learn_synthetic(tmp_path: Path, ray_dir: Path) -> None:
    state = tmp_path / "state"
    args = ("--clients", "1000", "--clients-per-round", "50", "--rounds", "10")
    _simulate(state, ray_dir, SYNTHETIC_LEARNABLE, *args, "--workers", "2")
    status = status_json(state)
    assert status["rounds_completed"] == 10
    assert all(r["participants"] == 50 for r in status["rounds"])
    first, last = status["rounds"][0]["metrics"], status["rounds"][-1]["metrics"]
    assert last["loss"] < first["loss"]
    assert last["accuracy"] > first["accuracy"]
    # Five times chance, well above always answering the majority class.
    assert last["accuracy"] >= 0.5 > MAJORITY_CLASS + 0.2
    # Only clients that ran are recorded: at most 10 x 50 of the 1,000.
    assert status["clients"] <= 500


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_kill9_mid_simulation_resumes(tmp_path: Path, ray_dir: Path, procs: list[Proc]) -> None:
    state = tmp_path / "state"
    args = _sim_args(state, ray_dir, DIGITS, "--clients", "20", "--clients-per-round", "4")
    args += ["--rounds", "6", "--workers", "1"]
    # Frozen (fault injection) right after round 3's first update is counted in memory only.
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"FEDGRPC_FAULT": "collect:3", "FEDGRPC_FAULT_DIR": str(markers)}
    first = spawn("sim-1", ["-m", "fedserver.cli", *args], tmp_path / "logs", env)
    procs.append(first)
    wait_until(lambda: (markers / "collect-3.hit").exists(), 300, "round 3's first update")
    first.kill()  # SIGKILL: no cleanup at all
    before = status_json(state)
    done = before["rounds_completed"]
    assert done == 2, first.log()

    second = spawn("sim-2", ["-m", "fedserver.cli", *args], tmp_path / "logs")
    procs.append(second)
    assert second.wait(240) == 0, second.log()
    after = status_json(state)
    assert after["status"] == "finished"
    assert [r["round"] for r in after["rounds"]] == list(range(1, 7))
    # Completed rounds are kept as they were, not redone.
    assert after["rounds"][:done] == before["rounds"][:done]
    assert f"resuming from {state}: {done} round(s) completed" in second.log()
