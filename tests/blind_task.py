"""Digits without a held-out set on the coordinator: round metrics hold no held-out `accuracy`
of the coordinator's own, so a client's reported `accuracy` is the only one there is (the case
where a shared namespace would show it as the coordinator's)."""

from __future__ import annotations

from torch.utils.data import Dataset

from examples.digits import DigitsTask


class BlindDigits(DigitsTask):
    def server_test_data(self) -> Dataset | None:
        return None


task = BlindDigits()
