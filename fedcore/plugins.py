"""Load user objects named as `package.module:attribute` (tasks, strategies)."""

from __future__ import annotations

import importlib
from typing import Any


def load_object(spec: str) -> Any:
    """Import `module:attr`; if it names a class, return an instance made with no arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTRIBUTE (e.g. examples.digits:task), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {e}") from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj() if isinstance(obj, type) else obj
