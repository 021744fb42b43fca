"""--dp-clip against a dishonest client: a real coordinator process, the test as a raw client
over gRPC (tests/raw_client.py) sending an update that was never clipped."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedcore import checksums
from fedcore.files import read_safetensors
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import FlatModel, float_vector
from fedcore.wire import update_stream
from tests.raw_client import lone_client, pull, update_header

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
CLIENT = "cheater"
CLIP = 0.5


def _submit(
    stub: pb_grpc.CoordinatorStub, round_number: int, model: FlatModel, delta: np.ndarray
) -> None:
    payload = delta.astype("<f4").tobytes()
    header = update_header(CLIENT, round_number, model, len(payload), checksum=checksums.DEFAULT)
    digest = checksums.hexdigest(checksums.DEFAULT, payload)
    reply = stub.SubmitUpdate(update_stream(header, payload, digest), timeout=30)
    assert reply.accepted and not reply.duplicate


def test_unclipped_update_moves_the_model_by_at_most_the_clip(tmp_path: Path) -> None:
    """Noise multiplier 0 (clipping only): the model moves by exactly the re-clipped update;
    the next round, an update within the bound is folded bit for bit."""
    flags = ("--rounds", "2", "--round-timeout", "600", "--dp-clip", str(CLIP))
    with lone_client(tmp_path, CLIENT, *flags, "--dp-noise-multiplier", "0") as joined:
        base = float_vector(joined.model)
        huge = np.full(base.size, 1000.0, np.float32)  # norm ~69,000: never clipped
        _submit(joined.stub, joined.header.round, joined.model, huge)

        header, first = pull(joined.stub, CLIENT)
        assert header.round == joined.header.round + 1 and first is not None
        moved = float_vector(first).astype(np.float64) - base
        # FedAvg adds the mean in float32: allow the rounding of base + mean.
        slack = 2**-23 * float(np.abs(base).max() + 1) * math.sqrt(base.size)
        assert np.linalg.norm(moved) <= CLIP + slack
        np.testing.assert_allclose(moved, CLIP / math.sqrt(base.size), atol=1e-6)

        small = np.random.default_rng(0).normal(0, 1e-4, base.size).astype(np.float32)
        assert np.linalg.norm(small.astype(np.float64)) < CLIP
        _submit(joined.stub, header.round, first, small)
        # The long poll answers once the last round is committed and training has finished.
        header, _ = pull(joined.stub, CLIENT, wait_seconds=60, timeout=90)
        assert header.state == pb.FINISHED
        final, _ = read_safetensors(tmp_path / "state" / "model.safetensors")
        expected = float_vector(first) + small  # within C: not scaled, not even by 1.0
        assert float_vector(final).tobytes() == expected.tobytes()
