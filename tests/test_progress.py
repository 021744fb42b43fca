"""Progress bars appear on a terminal (a pty here) and nowhere else."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.procs import REPO, TASK, child_env, free_port, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


class OnTty:
    """A real process whose stdout and stderr are a pseudo-terminal; output collected."""

    def __init__(self, args: Sequence[str]) -> None:
        master, slave = pty.openpty()
        env = dict(child_env(), TERM="xterm-256color", COLUMNS="120")
        self.popen = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
            env=env, cwd=REPO,
        )  # fmt: skip
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self.reader.start()

    def _read(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            self.chunks.append(data)
        os.close(fd)

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.popen.wait(timeout=timeout)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
        self.reader.join(timeout=10)
        return code, b"".join(self.chunks).decode(errors="replace")


CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen(output: str) -> list[str]:
    """The terminal's lines after `output`, for the few controls rich's live display uses
    (cursor up/down/column, erase line/below); colours and cursor visibility are ignored."""
    lines: list[list[str]] = [[]]
    row = col = 0
    pos = 0
    while pos < len(output):
        match = CSI.match(output, pos)
        if match:
            params, command = match.groups()
            n = int(params) if params.isdigit() else None
            if command == "A":
                row = max(0, row - (n or 1))
            elif command == "B":
                row += n or 1
            elif command == "G":
                col = (n or 1) - 1
            elif command == "K":
                lines[row] = [] if n == 2 else lines[row][:col]
            elif command == "J":
                del lines[row + 1 :]
                lines[row] = lines[row][:col]
            pos = match.end()
            continue
        char = output[pos]
        pos += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
        elif char >= " ":
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
        while len(lines) <= row:
            lines.append([])
    return ["".join(line).rstrip() for line in lines]


def test_bars_on_a_terminal(tmp_path: Path) -> None:
    port = free_port()
    server = OnTty(
        ["-m", "fedserver.cli", "run", "--task", TASK, "--port", str(port), "--rounds", "1",
         "--min-clients", "1", "--local-epochs", "3", "--state-dir", str(tmp_path / "state"),
         "--linger", "10"]
    )  # fmt: skip
    try:
        wait_serving(port)
        # Three epochs of digits take milliseconds: --slowdown keeps the round open for a few
        # seconds, so the coordinator's bar (redrawn every 0.5 s) is drawn while it is.
        client = OnTty(
            ["-m", "fedclient.cli", "run", "--server", f"127.0.0.1:{port}", "--task", TASK,
             "--client-id", "tty-client", "--threads", "1", "--slowdown", "20"]
        )  # fmt: skip
        client_code, client_out = client.finish(120)
    finally:
        server_code, server_out = server.finish(60)
    assert client_code == 0, client_out
    assert server_code == 0, server_out
    assert "round 1 local epochs" in client_out and "3/3" in client_out
    assert "round 1/1 updates" in server_out
    # Log lines still reach the terminal while the bar is live.
    assert "round 1/1 closed" in server_out
    assert "training is finished" in client_out
    # Once done, no bar is left on either screen: it would read as stale ("round 1/1 updates
    # 0/1" under "training finished").
    for out, last in ((server_out, "coordinator stopped"), (client_out, "training is finished")):
        shown = [line for line in screen(out) if line]
        assert not any("━" in line for line in shown), "\n".join(shown)
        assert last in shown[-1], "\n".join(shown)
