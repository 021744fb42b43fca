"""Digits Tasks that misbehave on purpose, for the reliability tests.

`task` (FlakyDigits): train() may kill -9 its own process.

FLAKY_P is the probability that a client dies in a given round, decided by the round's seed
(which the coordinator's round number and the client id determine), so a run is reproducible.
FLAKY_DIR records each death: a client restarted in the same round does not die twice.

`gated` (GatedDigits): the GATE_CALL-th call of train() writes FLAKY_DIR/gate-waiting and
blocks until the test creates FLAKY_DIR/gate-open, so the test can act while it is mid-round.

`broken` (BrokenDigits): train() raises, as a bug in the user's training code would.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import torch
from torch.utils.data import Dataset

from examples.digits import DigitsTask
from fedclient.task import TrainConfig, TrainResult
from tests.procs import wait_until


class FlakyDigits(DigitsTask):
    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        p = float(os.environ.get("FLAKY_P", "0"))
        if p and random.Random(config.seed).random() < p:
            grave = Path(os.environ["FLAKY_DIR"]) / f"{config.seed}.died"
            if not grave.exists():
                grave.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return super().train(model, data, config)


class GatedDigits(DigitsTask):
    calls = 0

    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        self.calls += 1
        if self.calls == int(os.environ.get("GATE_CALL", "0")):
            folder = Path(os.environ["FLAKY_DIR"])
            (folder / "gate-waiting").write_text(str(os.getpid()))
            wait_until((folder / "gate-open").exists, 300, "the test to open the gate")
        return super().train(model, data, config)


class BrokenDigits(DigitsTask):
    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        raise ValueError("loss is NaN at batch 3: check the learning rate")


task = FlakyDigits()
broken = BrokenDigits()
gated = GatedDigits()
