"""Model download limits (--max-model-sends, --max-pulls-per-client,
--send-stall-timeout): plain settings, enforced by transport/downloads.py."""

from __future__ import annotations

from dataclasses import dataclass

MAX_CONCURRENT_SENDS = 256


MAX_PULLS_PER_CLIENT = 2


SEND_STALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class DownloadLimits:
    max_sends: int = MAX_CONCURRENT_SENDS  # --max-model-sends
    pulls_per_client: int = MAX_PULLS_PER_CLIENT  # --max-pulls-per-client
    stall_timeout: float = SEND_STALL_TIMEOUT  # --send-stall-timeout

    def __post_init__(self) -> None:
        if self.max_sends < 1:
            raise ValueError("--max-model-sends must be at least 1")
        if self.pulls_per_client < 1:
            raise ValueError("--max-pulls-per-client must be at least 1")
        if not self.stall_timeout > 0:
            raise ValueError("--send-stall-timeout must be more than 0 seconds")
