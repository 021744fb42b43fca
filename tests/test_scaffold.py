"""SCAFFOLD (docs/algorithms.md): the coordinator's variate math against hand-computed numbers,
the client's corrected step and its c_i (option II), the client's state file, and what the
coordinator refuses to combine it with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedclient.retry import PermanentError
from fedclient.scaffold import STATE_FILE, ControlVariate, corrected_steps
from fedclient.task import TrainConfig
from fedclient.update import round_tensors
from fedcore.scaffold import CONTROL_PREFIX, ROUND_KEY, control_model, exchanged
from fedcore.tensors import FlatModel, Manifest, TensorSpec, flatten_arrays, float_vector
from fedserver.strategies import AggregateInput, build_strategy
from fedserver.strategies.scaffold import Scaffold, control_step


def model_of(w: list[float], b: float) -> FlatModel:
    return flatten_arrays(
        {
            "w": np.array(w, dtype=np.float32),
            "b": np.array([b], dtype=np.float32),
            "steps": np.array([7], dtype=np.int64),  # not a float: never aggregated, no c
        }
    )


def test_exchanged_manifest_is_the_floats_then_one_float32_delta_c_per_float_tensor() -> None:
    floats = model_of([0, 0], 0).manifest.floats()
    names = [t.name for t in exchanged(floats).tensors]
    assert names == ["w", "b", CONTROL_PREFIX + "w", CONTROL_PREFIX + "b"]
    assert {t.dtype for t in exchanged(floats).tensors[2:]} == {"float32"}


def test_server_step_matches_a_hand_computed_two_round_example() -> None:
    strategy = build_strategy("scaffold", server_lr=0.5)
    x = model_of([1.0, 2.0], 3.0)
    # Round 1: 2 of N = 4 clients counted; mean [Δy | Δc] = [0.2, -0.4, 0.6 | 1.0, 2.0, -4.0].
    mean = np.array([0.2, -0.4, 0.6, 1.0, 2.0, -4.0], dtype=np.float32)
    x1 = strategy.apply(x, AggregateInput(1, mean, 10.0, 2, None, population=4))
    # x + 0.5 * Δy = [1.1, 1.8], 3.3; c = 0 + (2/4) * Δc = [0.5, 1.0], -2.0
    np.testing.assert_allclose(float_vector(x1), [1.1, 1.8, 3.3], rtol=0, atol=1e-6)
    assert x1.raw("steps").tolist() == [7]
    np.testing.assert_allclose(strategy.state_arrays()["control"], [0.5, 1.0, -2.0], atol=1e-7)
    # Round 2: 3 of 3 counted (full participation): c += 1 * Δc.
    mean2 = np.array([0, 0, 0, 0.25, -1.0, 2.0], dtype=np.float32)
    strategy.apply(x1, AggregateInput(2, mean2, 10.0, 3, None, population=3))
    np.testing.assert_allclose(strategy.state_arrays()["control"], [0.75, 0.0, 0.0], atol=1e-7)
    # What the next round's clients are sent: c as float32 tensors named like the model's floats.
    sent = strategy.client_tensors(x1)
    assert sent is not None and [t.name for t in sent.manifest.tensors] == ["w", "b"]
    np.testing.assert_allclose(float_vector(sent), [0.75, 0.0, 0.0], atol=1e-7)


def test_control_step_treats_an_unknown_or_smaller_population_as_full_participation() -> None:
    c, dc = np.array([1.0], np.float32), np.array([2.0], np.float32)
    assert control_step(c, dc, 3, 0).tolist() == [3.0]
    assert control_step(c, dc, 3, 2).tolist() == [3.0]
    assert control_step(c, dc, 1, 4).tolist() == [1.5]


def test_c_is_zero_before_the_first_round_and_survives_a_restart_bit_for_bit() -> None:
    x = model_of([1.0, 2.0], 3.0)
    first = Scaffold()
    assert float_vector(first.client_tensors(x)).tolist() == [0.0, 0.0, 0.0]  # type: ignore[arg-type]
    assert first.state_arrays() == {}
    mean = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=np.float32)
    x1 = first.apply(x, AggregateInput(1, mean, 1.0, 1, None, population=3))
    resumed = Scaffold()
    resumed.load_state_arrays(first.state_arrays())
    a = first.apply(x1, AggregateInput(2, mean, 1.0, 1, None, population=3))
    b = resumed.apply(x1, AggregateInput(2, mean, 1.0, 1, None, population=3))
    assert a.version == b.version
    assert first.client_tensors(a).version == resumed.client_tensors(b).version  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="expected"):
        Scaffold().load_state_arrays({"velocity": np.zeros(3, np.float32)})


def test_a_mean_without_delta_c_is_refused() -> None:
    x = model_of([1.0, 2.0], 3.0)
    with pytest.raises(ValueError, match="Δy and Δc"):
        Scaffold().apply(x, AggregateInput(1, np.zeros(3, np.float32), 1.0, 1))


# ---------------------------------------------------------------- the client


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(2, 1)


def floats_of(model: torch.nn.Module) -> Manifest:
    return Manifest(
        tuple(TensorSpec(n, "float32", tuple(p.shape)) for n, p in model.state_dict().items())
    )


def test_a_corrected_step_is_plain_sgd_on_g_minus_c_i_plus_c() -> None:
    model = linear_model()
    floats = floats_of(model)  # weight (1, 2), bias (1,)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    correction = np.array([0.5, -1.0, 2.0], dtype=np.float32)  # c - c_i
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with corrected_steps(model, floats, correction) as seen:
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        g_w, g_b = model.weight.grad.clone(), model.bias.grad.clone()  # type: ignore[union-attr]
        optimizer.step()
    # By hand: residual r = w0.x + b0 - 3, g_w = 2 r x, g_b = 2 r.
    r = float((w0 @ x.T + b0 - y).item())
    torch.testing.assert_close(g_w, torch.tensor([[2 * r * 1.0, 2 * r * 2.0]]))
    expected_w = w0 - 0.1 * (torch.tensor([[2 * r, 4 * r]]) + torch.tensor([[0.5, -1.0]]))
    expected_b = b0 - 0.1 * (torch.tensor([2 * r]) + torch.tensor([2.0]))
    torch.testing.assert_close(model.weight.detach(), expected_w)
    torch.testing.assert_close(model.bias.detach(), expected_b)
    # The raw gradient, not the corrected one, is what c_i⁺ averages.
    assert seen.steps == 1
    np.testing.assert_allclose(seen.mean(), [2 * r, 4 * r, 2 * r], rtol=1e-6)
    assert torch.equal(g_b, torch.tensor([2 * r]))
    # The hook is gone after the block: a later step is uncorrected.
    optimizer.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    before = model.bias.detach().clone()
    grad = model.bias.grad.clone()  # type: ignore[union-attr]
    optimizer.step()
    torch.testing.assert_close(model.bias.detach(), before - 0.1 * grad)


def test_c_i_plus_equals_option_ii_for_plain_sgd_over_several_steps() -> None:
    """c_i⁺ = c_i - c + (x - y_i)/(K·η_l) (the paper's option II) from the displacement equals
    the mean raw gradient the hook measures, for plain SGD."""
    model = linear_model()
    floats = floats_of(model)
    x0 = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()]).numpy().copy()
    c = np.array([0.3, -0.2, 0.1], dtype=np.float32)
    c_i = np.array([-0.1, 0.4, 0.0], dtype=np.float32)
    lr, steps = 0.05, 6
    gen = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with corrected_steps(model, floats, c - c_i) as seen:
        for _ in range(steps):
            xb = torch.randn(4, 2, generator=gen)
            yb = torch.randn(4, 1, generator=gen)
            optimizer.zero_grad()
            ((model(xb) - yb) ** 2).mean().backward()
            optimizer.step()
    y_i = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()]).numpy()
    option_ii = c_i - c + (x0 - y_i) / (steps * lr)
    assert seen.steps == steps
    np.testing.assert_allclose(seen.mean(), option_ii, rtol=1e-4, atol=1e-5)


def test_no_optimizer_step_is_an_error_not_a_zero_variate() -> None:
    model = linear_model()
    with corrected_steps(model, floats_of(model), np.zeros(3, np.float32)) as seen:
        pass
    with pytest.raises(ValueError, match="no optimizer step"):
        seen.mean()


def test_the_client_keeps_c_i_in_a_state_file_of_its_federation_and_id(tmp_path: Path) -> None:
    floats = model_of([0, 0], 0).manifest.floats()
    kept = ControlVariate(tmp_path / "client", "client-0")
    assert kept.current("fed-a", floats).tolist() == [0.0, 0.0, 0.0]
    kept.commit("fed-a", floats, np.array([1.5, -2.0, 0.25], np.float32))
    assert (tmp_path / "client" / STATE_FILE).exists()
    # A restarted client (a new process) reads it back...
    restarted = ControlVariate(tmp_path / "client", "client-0")
    assert restarted.current("fed-a", floats).tolist() == [1.5, -2.0, 0.25]
    # ...but never another federation's or another client's.
    assert ControlVariate(tmp_path / "client", "client-0").current("fed-b", floats).sum() == 0
    assert ControlVariate(tmp_path / "client", "client-1").current("fed-a", floats).sum() == 0


def test_a_scaffold_round_needs_a_state_dir_and_c_and_no_personal_tensors(tmp_path: Path) -> None:
    base = model_of([0, 0], 0)
    floats = base.manifest.floats()
    extra = {ROUND_KEY: "1"}
    c = control_model(floats, np.ones(3, np.float32))
    assert ControlVariate(None, "a").for_round({}, 1, None, base, "f") is None
    with pytest.raises(PermanentError, match="--state-dir"):
        ControlVariate(None, "a").for_round(extra, 1, (1, c), base, "f")
    with pytest.raises(PermanentError, match="without its control variate"):
        ControlVariate(tmp_path, "a").for_round(extra, 2, (1, c), base, "f")
    got = ControlVariate(tmp_path, "a").for_round(extra, 1, (1, c), base, "f")
    assert got is not None and got[0].tolist() == [1, 1, 1] and got[1].tolist() == [0, 0, 0]
    config = TrainConfig(extra=extra)
    tensors = round_tensors(floats, config, "")
    assert tensors.sent.manifest == exchanged(floats)
    with pytest.raises(PermanentError, match="personal tensors"):
        round_tensors(floats, config, "b")


# ---------------------------------------------------------------- the client's download


class FakeCalls:
    def __init__(self, messages: list[object]) -> None:
        self.messages = messages

    def pull(self, request: object, timeout: float) -> list[object]:
        return self.messages


def pulled(session: object, header: object, *buffers: np.ndarray) -> object:
    from fedcore.proto import coordinator_pb2 as pb
    from fedcore.tensors import iter_chunks

    data = [memoryview(c) for b in buffers for c in iter_chunks(b, 8)]  # small chunks
    session.calls = FakeCalls([pb.ModelChunk(header=header), *data])  # type: ignore[attr-defined]
    return session._pull()  # type: ignore[attr-defined]


def test_the_client_reads_c_after_the_model_or_alone_when_it_holds_the_model() -> None:
    from fedclient.partition import Partition
    from fedclient.session import ClientSession
    from fedclient.settings import ClientSettings
    from fedcore.proto import coordinator_pb2 as pb
    from fedcore.wire import manifest_to_proto

    settings = ClientSettings(server="127.0.0.1:9", partition=Partition(0, 1), client_id="c")
    session = ClientSession(settings, task=None)  # type: ignore[arg-type]
    x = model_of([1.0, 2.0], 3.0)
    c = control_model(x.manifest.floats(), np.array([0.5, -1.0, 2.0], np.float32))

    def header(round_number: int, with_model: bool) -> pb.ModelHeader:
        h = pb.ModelHeader(state=pb.TRAINING, round=round_number, selected=True)
        h.model_version = x.version
        h.manifest.CopyFrom(manifest_to_proto(x.manifest))
        h.total_bytes = x.buffer.size if with_model else 0
        h.strategy_manifest.CopyFrom(manifest_to_proto(c.manifest))
        h.strategy_version = c.version
        h.strategy_bytes = c.buffer.size
        return h

    pulled(session, header(1, True), x.buffer, c.buffer)
    assert session.held is not None and session.held.version == x.version
    assert session.strategy_tensors is not None
    assert session.strategy_tensors[0] == 1 and session.strategy_tensors[1].version == c.version
    session.strategy_tensors = None
    pulled(session, header(2, False), c.buffer)  # the client already holds this model
    assert session.strategy_tensors is not None and session.strategy_tensors[0] == 2
    assert float_vector(session.strategy_tensors[1]).tolist() == [0.5, -1.0, 2.0]
    # Bytes that do not hash to strategy_version: not used, pulled again.
    bad = c.buffer.copy()
    bad[0] ^= 1
    answer = pulled(session, header(3, False), bad)
    assert not answer.selected  # type: ignore[attr-defined]
    assert session.strategy_tensors is None or session.strategy_tensors[0] != 3
    session.channel.close()
