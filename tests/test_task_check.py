"""A newcomer's own Task: found in the working directory, tried with `fedclient check`, and its
common mistakes explained with the fix, by `check` and by a `fedclient run` whose round fails.

Each command runs as a user runs it: from the folder holding blobs.py, with `python -P` so the
working directory is not on the path by accident (as with the `fedclient` console script).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import REPO, Proc, child_env, free_port, spawn, start_serving

pytestmark = pytest.mark.timeout(180)
FIXES = {
    "float64": "fix: features are float64 but the model is float32: convert with .float() / "
    "torch.float32 in load_partition",
    "bare": "fix: load_partition returned TensorDataset; return "
    "fedclient.task.LocalData(train=..., test=...)",
    "float_target": "fix: targets are float but objective is 'multiclass': set objective = "
    '"regression" or return integer class labels',
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A user's folder with their task file in it."""
    shutil.copy(REPO / "tests" / "newcomer_task.py", tmp_path / "blobs.py")
    return tmp_path


def cli(folder: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", module, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=folder,
        timeout=120,
    )


def test_check_passes_a_good_task_found_in_the_working_directory(folder: Path) -> None:
    out = cli(folder, "fedclient.cli", "check", "--task", "blobs:task", "--partition", "0/2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("task blobs:task is ready:\n"), out.stdout
    assert "partition 0/2: 64 training and 64 test examples" in out.stdout
    assert "trained on 32 examples in " in out.stdout
    assert "evaluated 64 test examples (accuracy " in out.stdout


@pytest.mark.parametrize("name", sorted(FIXES))
def test_check_explains_each_mistake_with_its_fix(folder: Path, name: str) -> None:
    out = cli(folder, "fedclient.cli", "check", "--task", f"blobs:{name}")
    assert out.returncode == 1, out.stderr
    assert f"task blobs:{name} is not ready: " in out.stderr
    assert FIXES[name] in out.stderr
    assert "Traceback" not in out.stderr


def test_a_module_not_found_says_where_it_looked(folder: Path) -> None:
    out = cli(folder, "fedserver.cli", "run", "--task", "blob:task", "--state-dir", "state")
    assert out.returncode == 2, out.stderr
    assert "cannot import module 'blob' from 'blob:task': No module named 'blob'; looked for " in (
        out.stderr
    )
    assert f"in the working directory {folder} and on the Python path (" in out.stderr
    out = cli(folder, "fedclient.cli", "check", "--task", "blobs.py:task")
    assert out.returncode == 2
    assert "--task takes a module name, not a file: use blobs:task" in out.stderr


def test_run_refuses_a_wrong_partition_type_before_connecting(folder: Path) -> None:
    """No coordinator listens there: the mistake is reported first, not after retries."""
    out = cli(folder, "fedclient.cli", "run", "--server", "127.0.0.1:1", "--task", "blobs:bare")
    assert out.returncode == 1, out.stderr
    assert FIXES["bare"] in out.stderr
    assert "fedclient check --task blobs:bare" in out.stderr
    assert "retrying" not in out.stderr


@pytest.mark.integration
def test_a_failing_first_round_is_explained_like_check(folder: Path, procs: list[Proc]) -> None:
    port = free_port()
    logs = folder / "logs"
    env = {"PYTHONPATH": f"{folder}:{REPO}"}  # the coordinator runs from the repo
    start_serving(
        procs, logs, port, folder / "state", "--min-clients", "1", "--rounds", "1",
        task="blobs:task", env=env,
    )  # fmt: skip
    args = ["-P", "-m", "fedclient.cli", "run", "--server", f"127.0.0.1:{port}"]
    args += ["--task", "blobs:float64", "--threads", "1", "--give-up-after", "60"]
    client = spawn("client", args, logs, env)
    procs.append(client)
    assert client.wait(120) == 1, client.log()
    log = client.log()
    assert "round 1: training failed: RuntimeError: mat1 and mat2 must have the same dtype" in log
    assert FIXES["float64"] in log
    assert "Traceback" not in log
