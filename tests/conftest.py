"""Shared fixtures: a log folder per test whose contents are shown when the test fails."""

from __future__ import annotations

import os
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


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A permissive umask (022, the common default) for the test: files and folders that must
    stay private have to be made so explicitly, not by luck of a strict umask."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)
