"""Shared fixtures: a log folder per test whose contents are shown when the test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Proc


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    """Processes registered here are killed after the test, whatever happened."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()
