"""Load user objects named as `package.module:attribute` (tasks, strategies)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def load_object(spec: str) -> Any:
    """Import `module:attr`; if it names a class, return an instance made with no arguments.

    The module is looked up on the Python path and, like uvicorn and Flower do, in the working
    directory: `fedserver run --task blobs:task` next to blobs.py works even when the console
    script's path does not hold the working directory.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTRIBUTE (e.g. examples.digits:task), got {spec!r}")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        dotted = module_name.removesuffix(".py").replace(os.sep, ".").replace("/", ".")
        raise ValueError(
            f"--task takes a module name, not a file: use {dotted.strip('.')}:{attr} "
            f"(run from the folder that holds the module's top-level package)"
        )
    _add_working_directory()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"cannot import module {module_name!r} from {spec!r}: {_hint(module_name, e)}"
        ) from e
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {e}") from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj() if isinstance(obj, type) else obj


def _add_working_directory() -> None:
    # Appended, not prepended: a file in the working directory never shadows an installed
    # module of the same name (a stray logging.py or grpc.py would break the process).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _hint(module_name: str, error: ModuleNotFoundError) -> str:
    """Why the import failed: the module itself is nowhere to be found (say where we looked),
    or it was found and imports something that is not installed."""
    missing = error.name or ""
    if missing and module_name != missing and not module_name.startswith(missing + "."):
        return (
            f"{error} (imported by {module_name}; is that package installed in this environment?)"
        )
    path = (missing or module_name).replace(".", os.sep)
    looked = [p for p in sys.path if p and p != os.getcwd()]
    shown = ", ".join(looked[:8]) + (f" and {len(looked) - 8} more" if len(looked) > 8 else "")
    return (
        f"{error}; looked for {path}.py or {path}/ in the working directory {os.getcwd()} and "
        f"on the Python path ({shown}): run from the folder that holds it, or add that folder "
        f"to PYTHONPATH"
    )
