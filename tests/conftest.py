"""Shared fixtures: a log folder per test whose contents are shown when the test fails.

Tests marked `docker` (a real Docker engine, minutes of image build) run only when selected by
name in -m (`make docker-e2e`, `pytest -m docker`); `make test` and CI skip them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Proc

# A script's background job (`make test &`, `nohup ... &`) starts with SIGINT ignored and its
# children inherit that, so the tests that press Ctrl-C on a coordinator or client would see
# nothing happen. A handler here is reset to the default in every child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "docker" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="needs Docker: run `make docker-e2e` or `pytest -m docker`")
    for item in items:
        if item.get_closest_marker("docker") is not None:
            item.add_marker(skip)
