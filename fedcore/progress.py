"""Progress bars (rich) for people at a terminal; nothing at all otherwise.

Shown only when stderr is a terminal and logs are text: under docker, systemd, CI or with
--log-format json the output stays plain log lines. While a bar is live, log records are printed
above it instead of tearing it apart.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress


def wanted(log_format: str = "text") -> bool:
    return log_format == "text" and sys.stderr.isatty()


@contextlib.contextmanager
def live_progress(enabled: bool) -> Iterator[Progress | None]:
    """A started rich Progress on stderr (or None when disabled); stopped on exit."""
    if not enabled:
        yield None
        return
    # Imported here, not at the top: every coordinator and client imports this module, and
    # rich is only needed at a terminal (never in CI, docker or the test suite's processes).
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        console=Console(stderr=True),
        redirect_stderr=True,
        # Erased when stopped: a bar left behind reads as stale ("round 29/30 ... 2/3" under
        # "training finished"); the log lines above it tell how it ended.
        transient=True,
    )
    progress.start()
    # Our log handlers hold the real stderr; point them at rich's proxy so lines land above
    # the bar, and back when the bar is gone.
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    previous = [h.setStream(sys.stderr) for h in handlers]
    try:
        yield progress
    finally:
        for handler, stream in zip(handlers, previous, strict=True):
            if stream is not None:
                handler.setStream(stream)
        progress.stop()
