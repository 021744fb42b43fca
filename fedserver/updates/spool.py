"""Every verified update of a round as one row of an anonymous disk-backed float32
matrix, for the strategies that read all updates (median, trimmed mean, Krum, Bulyan,
q-FedAvg), with the client metrics such a strategy reads beside each row."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedserver.updates.receiver import StagedUpdate


class UpdateSpool:
    """Every verified update of a round as one row of a disk-backed float32 matrix.

    For strategies that need all updates (median, trimmed mean, Krum): rows are appended block
    by block from the staged spill, and the strategy reads the file through np.memmap in column
    blocks, so coordinator memory stays O(model) however many clients report. The file is
    anonymous (unlinked), so it vanishes with the process, even on kill -9.
    """

    def __init__(self, num_values: int, spill_dir: Path, metrics: tuple[str, ...] = ()) -> None:
        self.num_values = num_values
        self.weights: list[float] = []
        # Per row, the client metrics the strategy reads (q-FedAvg's loss), checked present at
        # the update's header (UpdateIntake).
        self.metrics: dict[str, list[float]] = {name: [] for name in metrics}
        spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._file: BinaryIO = tempfile.TemporaryFile(dir=spill_dir)  # noqa: SIM115

    @property
    def count(self) -> int:
        return len(self.weights)

    def append(
        self, update: StagedUpdate, weight: float, metrics: Mapping[str, float] | None = None
    ) -> None:
        row = self.count * self.num_values * 4
        # The row exists as zeros first: sparse (top-k) pieces only write scattered positions.
        self._file.truncate(row + self.num_values * 4)
        for piece in update.pieces():
            if piece.indices is not None:
                self._file.flush()
                mm = np.memmap(
                    self._file, dtype="<f4", mode="r+", offset=row, shape=(self.num_values,)
                )
                mm[piece.indices] = piece.values
                mm.flush()
                del mm
                continue
            self._file.seek(row + piece.offset * 4)
            self._file.write(np.ascontiguousarray(piece.values, dtype="<f4").tobytes())
        for name, kept in self.metrics.items():
            kept.append(float((metrics or {})[name]))
        self.weights.append(weight)

    def matrix(self) -> np.ndarray:
        """Read-only (count, num_values) float32 view of the rows on disk."""
        self._file.flush()
        if self.count == 0 or self.num_values == 0:
            return np.zeros((self.count, self.num_values), dtype=np.float32)
        return np.memmap(self._file, dtype="<f4", mode="r", shape=(self.count, self.num_values))

    def close(self) -> None:
        self._file.close()
