"""The fleet's virtual clock (`fedserver simulate --fleet`): what the coordinator reads as
time.monotonic() in a simulation of a device fleet. Only the driver moves it, to the next
event (an arrival, a deadline, a device coming online), so hours of fleet time take the host
no longer than the training in them; nothing ever sleeps to let it pass."""

from __future__ import annotations


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        """Move to `t`; never backwards (an event in the past is a driver bug)."""
        if t < self.now:
            raise ValueError(f"the virtual clock cannot go back from {self.now} to {t}")
        self.now = float(t)
