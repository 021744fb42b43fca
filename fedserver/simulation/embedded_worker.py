"""One worker process of the embedded engine: `python -m fedserver.simulation.embedded_worker
SPEC_JSON`, started by fedserver/simulation/embedded.py, serving `fedclient.virtual.
VirtualClients` over its stdin/stdout (frames.py) until the driver closes its stdin.

The round's model is a file in shared memory (/dev/shm) that the driver writes once per
version; every worker maps it read-only (np.memmap), so W workers cost one copy of the model,
not W, and no model bytes cross a pipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
from typing import Any

import numpy as np

from fedclient.virtual import VirtualClients, VirtualSpec
from fedserver.simulation import frames


class MappedModel:
    """The model file of the current version, mapped once and reused by every client here."""

    def __init__(self) -> None:
        self.path = ""
        self.buffer: np.ndarray | None = None

    def get(self, ref: dict[str, Any]) -> np.ndarray:
        if ref["path"] != self.path or self.buffer is None:
            # The driver unlinks the previous version's file once a new one exists; the old
            # mapping goes when nothing (VirtualClients' cached FlatModel) refers to it.
            size = int(ref["size"])
            if size:
                self.buffer = np.memmap(ref["path"], dtype=np.uint8, mode="r", shape=(size,))
            else:
                self.buffer = np.zeros(0, dtype=np.uint8)
            self.path = ref["path"]
        return self.buffer


# Linux's F_SETPIPE_SZ: a batch's results (K/4W encoded updates) should fit the pipe while the
# driver is busy folding the last batch, or the worker stops until it reads (64 KiB default).
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20  # the default /proc/sys/fs/pipe-max-size for unprivileged processes


def _widen_pipe(fd: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or above pipe-max-size
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)


def serve(spec: VirtualSpec) -> int:
    # The protocol owns the real stdout; whatever a task prints goes to stderr instead.
    wire = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _widen_pipe(wire.fileno())
    clients = VirtualClients(spec)
    model = MappedModel()
    wire.write(frames.pack([b"ready"]))
    wire.flush()
    stdin = sys.stdin.buffer
    while (message := frames.read_blocking(stdin)) is not None:
        op, ref, header, ids = frames.parse_request(message)
        buffer = model.get(ref)
        cut = buffer.size - int(ref.get("strategy", 0))  # the strategy's tensors follow the model
        if op == "fit":
            out = clients.fit(
                header, buffer[:cut], ids, buffer[cut:] if cut < buffer.size else None
            )
        else:
            out = clients.evaluate(header, buffer[:cut], ids)
        wire.write(frames.results(out))
        wire.flush()
    return 0


def main() -> int:
    # The driver logs each failed client itself: a worker repeating it would double the lines.
    logging.basicConfig(level=logging.ERROR, format="embedded worker: %(message)s")
    fields = json.loads(sys.argv[1])
    return serve(VirtualSpec(**fields))


if __name__ == "__main__":
    raise SystemExit(main())
