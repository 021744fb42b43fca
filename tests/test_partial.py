"""Partial updates: --train-tensors (fixed or rotating) and FedPer personal tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from examples.digits import task
from fedcore.codecs import Piece
from fedcore.selection import Selection, check_spec, round_selection
from fedcore.tensors import Manifest, ManifestError, TensorSpec
from fedserver.coordinator.central_eval import initial_model
from fedserver.state.history import read_status
from fedserver.updates.accumulator import Accumulator
from tests.procs import Proc, free_port, start_client, start_serving, wait_finished

FLOATS = Manifest(
    tuple(
        TensorSpec(n, "float32", s)
        for n, s in (("0.weight", (3, 2)), ("0.bias", (3,)), ("2.weight", (1, 3)), ("2.bias", (1,)))
    )
)


class _Staged:
    """A stand-in for StagedUpdate: yields the vector in ragged pieces."""

    def __init__(self, values: np.ndarray, cut: int = 2) -> None:
        self.values, self.cut = values.astype(np.float32), cut

    def pieces(self, transient: bool = False):  # type: ignore[no-untyped-def]
        for i in range(0, self.values.size, self.cut):
            yield Piece(i, self.values[i : i + self.cut])


def test_selection_maps_update_offsets_to_the_model() -> None:
    head = Selection.matching(FLOATS, "2.*")
    assert head.names == ("2.weight", "2.bias")
    assert head.segments == ((0, 9, 4),)  # adjacent tensors merge into one segment
    gappy = Selection.matching(FLOATS, "0.weight, 2.weight")
    assert gappy.segments == ((0, 0, 6), (6, 9, 3))
    full = np.arange(13, dtype=np.float32)
    part = gappy.extract(full)
    assert part.tolist() == [0, 1, 2, 3, 4, 5, 9, 10, 11]
    rebuilt = np.full(13, -1.0, dtype=np.float32)
    for piece in gappy.to_full(_Staged(part, cut=4).pieces()):
        rebuilt[piece.offset : piece.offset + piece.values.size] = piece.values
    assert rebuilt.tolist() == [0, 1, 2, 3, 4, 5, -1, -1, -1, 9, 10, 11, -1]
    with pytest.raises(ManifestError, match="matches no floating tensor"):
        Selection.matching(FLOATS, "fc9.*")
    with pytest.raises(ManifestError, match="not trained this round"):
        head.subset(["0.bias"])
    with pytest.raises(ManifestError, match="model's order"):
        head.subset(["2.bias", "2.weight"])


def test_sparse_and_dense_pieces_map_through_many_segments() -> None:
    """to_full visits only the segments a piece overlaps; the result equals extract's inverse."""
    rng = np.random.default_rng(3)
    floats = Manifest(tuple(TensorSpec(f"t{i}", "float32", (1 + i % 5,)) for i in range(200)))
    gappy = Selection.of_names(floats, [f"t{i}" for i in range(0, 200, 2)])
    full = rng.standard_normal(sum(t.numel for t in floats.tensors)).astype(np.float32)
    part = gappy.extract(full)
    want = np.zeros_like(full)
    for _, start, n in gappy.segments:
        want[start : start + n] = full[start : start + n]
    for cut in (1, 7, part.size):
        dense = np.zeros_like(full)
        for piece in gappy.to_full(_Staged(part, cut=cut).pieces()):
            dense[piece.offset : piece.offset + piece.values.size] = piece.values
        assert np.array_equal(dense, want)
    positions = np.sort(rng.choice(part.size, size=part.size // 3, replace=False))
    sparse = np.zeros_like(full)
    for start in range(0, positions.size, 9):
        idx = positions[start : start + 9]
        for piece in gappy.to_full([Piece(int(idx[0]), part[idx], idx)]):
            assert piece.indices is not None
            sparse[piece.indices] = piece.values
    expected = np.zeros_like(part)
    expected[positions] = part[positions]
    assert np.array_equal(gappy.extract(sparse), expected)
    assert np.count_nonzero(sparse) == np.count_nonzero(expected)


def test_rotation_and_startup_check() -> None:
    assert round_selection(FLOATS, "", 5).is_everything
    assert [round_selection(FLOATS, "0.*;2.*", r).names[0] for r in (1, 2, 3)] == [
        "0.weight",
        "2.weight",
        "0.weight",
    ]
    with pytest.raises(ManifestError):
        check_spec(FLOATS, "0.*;nothing.*")


def test_accumulator_averages_each_tensor_over_the_updates_that_carried_it() -> None:
    sizes = [t.numel for t in FLOATS.tensors]
    acc = Accumulator(13, sizes)
    acc.fold(_Staged(np.ones(13)), 1.0)  # a full update, weight 1
    no_bias = Selection.matching(FLOATS, "0.*,2.weight")  # a FedPer client keeping 2.bias
    acc.fold(_Staged(np.full(12, 4.0)), 3.0, no_bias)
    mean = acc.mean()
    np.testing.assert_allclose(mean[:12], (1 * 1 + 3 * 4) / 4)
    assert mean[12] == 1.0  # only the full update carried 2.bias
    frozen = Accumulator(13, sizes)
    frozen.fold(_Staged(np.ones(4)), 2.0, Selection.matching(FLOATS, "2.*"))
    assert frozen.mean().tolist() == [0.0] * 9 + [1.0] * 4  # nobody sent 0.*: zero delta


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_rotating_subsets_and_a_personal_layer_end_to_end(
    tmp_path: Path, procs: list[Proc]
) -> None:
    rounds = 6
    port = free_port()
    state, logs = tmp_path / "state", tmp_path / "logs"
    args = ("--rounds", str(rounds), "--min-clients", "3", "--train-tensors", "0.*;2.*")
    server = start_serving(procs, logs, port, state, *args)
    clients = [start_client(logs, port, f"{i}/3") for i in range(2)]
    clients.append(start_client(logs, port, "2/3", "--personal-tensors", "2.bias"))
    procs.extend(clients)
    wait_finished(server, clients, 150)

    floats = initial_model(task, 0).manifest.floats()
    size = {t.name: 4 * t.numel for t in floats.tensors}
    full = sum(size.values())
    body = size["0.weight"] + size["0.bias"]
    head = size["2.weight"] + size["2.bias"]
    status = read_status(state)
    got = [r["bytes_in"] for r in status["rounds"]]
    # Odd rounds train 0.*; even rounds 2.*, where client 2 keeps 2.bias to itself.
    assert got == [3 * body if r % 2 else 2 * head + size["2.weight"] for r in range(1, rounds + 1)]
    saved = 1 - sum(got) / (rounds * 3 * full)
    print(
        f"partial updates: {sum(got)} update bytes vs {rounds * 3 * full} full ({saved:.1%} saved)"
    )
    assert saved > 0.45

    ckpt = [load_file(state / "checkpoints" / f"round-{r:04d}.safetensors") for r in range(3)]
    assert all((ckpt[1][n] == ckpt[0][n]).all() for n in ("2.weight", "2.bias"))  # frozen
    assert all((ckpt[2][n] == ckpt[1][n]).all() for n in ("0.weight", "0.bias"))
    assert not (ckpt[1]["0.weight"] == ckpt[0]["0.weight"]).all()
    assert not (ckpt[2]["2.bias"] == ckpt[1]["2.bias"]).all()  # clients 0 and 1 sent it
    assert status["rounds"][-1]["metrics"]["accuracy"] >= 0.9
