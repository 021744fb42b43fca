"""Logging for both daemons: readable lines on a terminal, JSON lines for log shippers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping

from fedcore.limits import MAX_LOG_MESSAGE


class ClipMessages(logging.Filter):
    """Cut a record's message to MAX_LOG_MESSAGE characters: log lines quote client input
    (ids, refusal reasons), and no client may grow the log by megabytes per message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LOG_MESSAGE:
            record.msg = f"{message[:MAX_LOG_MESSAGE]}... ({len(message)} characters)"
            record.args = None
        if record.exc_info and not record.exc_text:
            # An exception's text may quote client input too: keep both ends of the traceback.
            text = logging.Formatter().formatException(record.exc_info)
            if len(text) > 2 * MAX_LOG_MESSAGE:
                head, tail = text[:MAX_LOG_MESSAGE], text[-MAX_LOG_MESSAGE:]
                text = f"{head}\n... ({len(text) - 2 * MAX_LOG_MESSAGE} characters) ...\n{tail}"
            record.exc_text = text
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


# gRPC's C core logs through absl to stderr (a refused TLS handshake: one "Handshake failed"
# line per attempt), read once when grpc is imported. Quiet unless the user set it: our own
# lines say what went wrong; GRPC_VERBOSITY=ERROR (or INFO, DEBUG) brings gRPC's back.
GRPC_VERBOSITY_DEFAULT = "NONE"


def quiet_grpc() -> None:
    """Called by both packages' __init__, before anything imports grpc."""
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY_DEFAULT)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S")
        )
    handler.addFilter(ClipMessages())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def format_metrics(metrics: Mapping[str, float], sep: str = "=", join: str = " ") -> str:
    """`accuracy=0.9722 dp_delta=1e-05 loss=0.1516`: sorted, 4 significant digits, so small
    values (a DP delta, a learning rate) do not print as 0.0000."""
    return join.join(f"{k}{sep}{v:.4g}" for k, v in sorted(metrics.items()))


LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_flags(parser: argparse.ArgumentParser, level_help: str = "") -> None:
    """--log-level and --log-format, the same on every command that logs."""
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help=level_help or "least severe log lines shown (info)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text for people, json lines for log shippers (text)",
    )
