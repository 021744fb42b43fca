"""State dirs as a newcomer meets them: a finished run is never silently "resumed" (nor its
stored total lowered), `simulate` keeps out of a deployment's ./state, and every file `make
demo` leaves in its state dir is owner-only whatever the umask."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedserver.cli import build_parser
from tests.procs import (
    REPO,
    Proc,
    child_env,
    fedserver,
    free_port,
    start_clients,
    start_serving,
    status_json,
    wait_finished,
)

pytestmark = pytest.mark.timeout(240)
ROUNDS = 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state dir whose 2-round run is finished."""
    tmp = tmp_path_factory.mktemp("finished")
    procs: list[Proc] = []
    try:
        port = free_port()
        server = start_serving(
            procs, tmp / "logs", port, tmp / "state", "--rounds", str(ROUNDS),
            # --linger waits only until the client has heard "finished": with 0 the coordinator
            # could stop while the client's last pull was in flight (CANCELLED, the client then
            # retried a stopped coordinator for 120 s and exited 1).
            "--min-clients", "1", "--linger", "60",
        )  # fmt: skip
        wait_finished(server, start_clients(procs, tmp / "logs", port, 1), 180)
        yield tmp / "state"
    finally:
        for proc in procs:
            proc.kill()


def _nothing_to_do(state: Path) -> str:
    return (
        f"nothing to do: {ROUNDS} rounds already completed in {state} (use --rounds > {ROUNDS} "
        "to continue, or another --state-dir)"
    )


@pytest.mark.integration
def test_fewer_rounds_than_done_is_refused_and_the_total_kept(finished: Path) -> None:
    out = fedserver(
        "run", "--task", "examples.digits:task", "--port", str(free_port()),
        "--state-dir", str(finished), "--rounds", "1",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert _nothing_to_do(finished) in out.stderr
    status = status_json(finished)
    assert (status["status"], status["total_rounds"]) == ("finished", ROUNDS)


@pytest.mark.integration
def test_the_same_rounds_again_serves_finished_with_a_warning(finished: Path) -> None:
    """A coordinator restarted after its last commit (restart: on-failure) tells late clients
    that training is over, and exits 0: a restart loop would follow a failure status."""
    out = fedserver(
        "run", "--task", "examples.digits:task", "--port", str(free_port()),
        "--state-dir", str(finished), "--rounds", str(ROUNDS), "--linger", "0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"WARNING {_nothing_to_do(finished)}; telling clients that training is finished" in (
        out.stderr
    )
    assert status_json(finished)["total_rounds"] == ROUNDS


@pytest.mark.integration
def test_simulate_refuses_a_finished_state_dir(finished: Path, tmp_path: Path) -> None:
    out = fedserver(
        "simulate", "--task", "examples.digits:task", "--clients", "2",
        "--state-dir", str(finished), "--rounds", str(ROUNDS),
        "--ray-temp-dir", str(tmp_path / "ray"),
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert _nothing_to_do(finished) in out.stderr


def test_simulate_has_a_state_dir_of_its_own() -> None:
    parser = build_parser()
    simulate = parser.parse_args(["simulate", "--task", "m:t", "--clients", "2"])
    run = parser.parse_args(["run", "--task", "m:t"])
    assert (simulate.state_dir, run.state_dir) == (Path("sim-state"), Path("state"))


@pytest.mark.integration
@pytest.mark.usefixtures("open_umask")
def test_demo_state_dir_is_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    out = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--rounds", "1", "--clients", "1",
         "--state-dir", str(state)],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=180,
    )  # fmt: skip
    assert "demo: 1 rounds in" in out.stdout, out.stdout + out.stderr
    paths = [state, *state.rglob("*")]
    assert (state / "logs" / "client-0.log").exists() and (state / "logs/coordinator.log").exists()
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {name: 0o700 if (tmp_path / name).is_dir() else 0o600 for name in modes}
    assert modes == expected
    assert "open to other users" not in out.stdout  # made private, not tightened afterwards
