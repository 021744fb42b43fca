"""Every coordinator and client process the suite starts pays for its imports: keep the heavy,
flag-only ones out of a plain start (the CPU it saves is measured in bench/, not asserted here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import REPO, child_env

# Needed only under a flag or subcommand: DP accounting (opacus, scipy.stats), --secure he,
# `fedserver report`, simulate, progress bars at a terminal. scikit-learn belongs to the example
# tasks, which load it with their data. The llm extra (transformers, peft, tokenizers) loads
# when a LoRA task builds its model, never at import.
LLM = ("transformers", "peft", "tokenizers")
OPTIONAL = (
    *("opacus", "scipy", "tenseal", "matplotlib", "ray", "rich", "sklearn", *LLM),
    *("mlflow", "tensorboard"),  # --track's trackers (fedcore/tracking)
)


def loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has imported after running `statement`."""
    probe = f"import sys\n{statement}\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.timeout(150)
def test_cli_imports_leave_optional_dependencies_out() -> None:
    assert loaded_after("import fedserver.cli, fedclient.cli", OPTIONAL) == []


@pytest.mark.timeout(150)
def test_coordinator_cli_does_not_import_torch() -> None:
    # A torch-free task keeps torch out of the coordinator (fedserver/coordinator/central_eval.py).
    assert loaded_after("import fedserver.cli", ("torch",)) == []


@pytest.mark.timeout(150)
def test_lora_modules_import_without_the_llm_extra() -> None:
    # fedclient/lora.py and the example import transformers/peft only inside functions.
    statement = (
        "import fedclient.lora, examples.stdlib_lm, fedserver.transport.service, fedclient.session"
    )
    assert loaded_after(statement, LLM) == []


@pytest.mark.timeout(150)
def test_embedded_simulation_never_imports_ray(tmp_path: Path) -> None:
    """`fedserver simulate` runs without Ray (an optional extra): the driver with its in-process
    clients, and the modules its worker processes import."""
    args = ["simulate", "--task", "examples.digits:task", "--clients", "2", "--rounds", "1"]
    args += ["--workers", "0", "--state-dir", str(tmp_path / "s"), "--log-level", "warning"]
    run = f"from fedserver.cli import main\nassert main({args!r}) == 0"
    assert loaded_after(run, ("ray",)) == []
    workers = "import fedserver.simulation.embedded_worker, fedserver.simulation.embedded"
    assert loaded_after(workers, ("ray",)) == []
