"""Digits with a wide hidden layer: a model of about 4.9 MB (1.2M float32 parameters), big
enough that one download outlasts gRPC's flow-control windows (tests/test_downloads.py)."""

from __future__ import annotations

from examples.digits import DigitsTask

task = DigitsTask(hidden=16384)
