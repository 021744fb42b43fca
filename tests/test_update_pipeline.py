"""One client update pipeline (fedclient/update.py) behind `fedclient run` and the simulation's
virtual clients: the same seed, round header and data give the same bytes on the wire."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from fedclient import model_memory
from fedclient.download import read_model_stream
from fedclient.local_update import float_delta, float_delta_in_place
from fedclient.model_memory import BoundModel
from fedclient.partition import Partition
from fedclient.session import ClientSession
from fedclient.settings import ClientSettings
from fedclient.virtual import VirtualClients, VirtualSpec, client_id
from fedcore import checksums
from fedcore.plugins import load_object
from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import FlatModel, flatten_state_dict, float_vector
from fedcore.wire import manifest_to_proto, update_messages

TASK = "tests.sim_tasks:noisy"  # draws from torch's, numpy's and random's global generators
CLIENTS, SEED = 4, 7


class CapturedUpload:
    """ModelCalls' submit, keeping the messages it would have sent."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def submit(self, messages: Iterator[bytes], timeout: float) -> Any:
        self.messages = [bytes(m) for m in messages]
        return SimpleNamespace(duplicate=False)


def _header(base: FlatModel, encoding: str, extra: dict[str, str]) -> pb.ModelHeader:
    return pb.ModelHeader(
        state=pb.TRAINING,
        round=3,
        selected=True,
        total_rounds=5,
        model_version=base.version,
        manifest=manifest_to_proto(base.manifest),
        total_bytes=base.buffer.size,
        config=pb.RoundConfig(
            local_epochs=1, lr=0.05, batch_size=16, encoding=encoding, extra=extra
        ),
    )


def _through_fedclient_run(
    base: FlatModel, header: pb.ModelHeader, index: int, after: Any = None, bound: bool = False
) -> list[bytes]:
    """The messages a session uploads for `header`; `after(session)` runs before it closes.
    `bound`: the model is one buffer, which `base` was downloaded into (as `fedclient run`
    holds a float32 CPU model: fedclient/model_memory.py)."""
    task = load_object(TASK)
    partition = Partition(index, CLIENTS, "iid", 0.5, SEED)
    settings = ClientSettings("127.0.0.1:1", partition, client_id=client_id(index), seed=SEED)
    session = ClientSession(settings, task)
    try:
        session.joined = True  # no Join: the upload is captured, nothing is dialled
        session.checksum = checksums.choose(checksums.ALGORITHMS)  # as Join's reply would set
        session.held = base.copy()  # the session consumes what it holds (its update)
        model = task.build_model()
        if bound:
            session.bound = BoundModel.bind(model, base.manifest)
            assert session.bound is not None
            session.bound.buffer[...] = base.buffer
            session.held = FlatModel(base.manifest, session.bound.buffer)
        upload = CapturedUpload()
        session.calls = upload  # type: ignore[assignment]
        session._train_and_submit(header, model, task.load_partition(partition))
        if after is not None:
            after(session)
    finally:
        session.channel.close()
    assert session.rounds_trained == 1
    return upload.messages


def _through_virtual_client(base: FlatModel, header: pb.ModelHeader, index: int) -> list[bytes]:
    clients = VirtualClients(VirtualSpec(TASK, CLIENTS, "iid", 0.5, SEED))
    [fitted] = clients.fit(header.SerializeToString(), base.buffer, [client_id(index)])
    assert not fitted.error and fitted.payload is not None
    update = pb.UpdateHeader.FromString(fitted.header)
    messages = [bytes(m) for m in update_messages(update, fitted.payload)]
    # What the simulation hands the coordinator whole is what fedclient digests as it sends.
    assert pb.UpdateChunk.FromString(messages[-1]).trailer.digest == fitted.digest
    return messages


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """A virtual client trains on one torch thread (VirtualSpec.threads): so does the session
    here, since float sums split over more threads may round differently."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("encoding", "extra"),
    [
        ("fp32", {}),
        ("topk:0.1", {"dp_clip": "0.5"}),  # error feedback, clipping
        ("int8", {"train_tensors": "2.weight,2.bias"}),  # a round training some tensors
    ],
)
@pytest.mark.parametrize("bound", [False, True], ids=["model-apart", "model-is-buffer"])
def test_fedclient_run_and_a_virtual_client_send_the_same_update(
    encoding: str, extra: dict[str, str], bound: bool
) -> None:
    base = flatten_state_dict(load_object(TASK).build_model().state_dict())
    header = _header(base, encoding, extra)
    sent = _through_fedclient_run(base, header, 2, bound=bound)
    assert len(sent) >= 3  # header, data, trailer
    assert sent == _through_virtual_client(base, header, 2)
    update = pb.UpdateChunk.FromString(sent[0]).header
    assert (update.client_id, update.round, update.base_version) == (
        client_id(2),
        3,
        base.version,
    )
    assert pb.UpdateChunk.FromString(sent[-1]).trailer.digest


def test_the_next_model_downloads_into_the_buffer_of_the_update_sent() -> None:
    base = flatten_state_dict(load_object(TASK).build_model().state_dict())
    header = _header(base, "fp32", {})
    header.model_checksum = base.checksum
    pulled = []

    def pull_again(session: ClientSession) -> None:
        spare = session._spare
        assert spare is not None and spare.size == base.buffer.size
        stream = [pb.ModelChunk(header=header), *base.chunks(1000)]
        pulled.append((spare, read_model_stream(stream, session._drop_held).model))

    _through_fedclient_run(base, header, 1, pull_again)
    [(spare, model)] = pulled
    # The update went out of that buffer; the new model is in it, bytes intact.
    assert model is not None and model.buffer is spare
    assert model.buffer.tobytes() == base.buffer.tobytes() and model.version == base.version


def test_a_model_of_one_buffer_trains_and_downloads_in_it() -> None:
    """The update goes out of the model's own memory, the base having been kept on disk, and
    the next model downloads into the model."""
    base = flatten_state_dict(load_object(TASK).build_model().state_dict())
    header = _header(base, "fp32", {})
    header.model_checksum = base.checksum
    seen = []

    def pull_again(session: ClientSession) -> None:
        assert session.bound is not None
        memory = session.bound.buffer
        seen.append(session._spare is memory)
        assert session.bound._base is not None  # the base was kept on disk, not in memory
        stream = [pb.ModelChunk(header=header), *base.chunks(1000)]
        model = read_model_stream(stream, session._drop_held).model
        assert model is not None and model.buffer is memory and model.version == base.version
        state = session.bound.model.state_dict()  # the model holds the new bytes
        assert flatten_state_dict(state).buffer.tobytes() == base.buffer.tobytes()

    sent = _through_fedclient_run(base, header, 1, pull_again, bound=True)
    assert seen == [True]
    assert sent == _through_fedclient_run(base, header, 1)


def test_a_spare_buffer_of_another_size_is_dropped_not_used() -> None:
    base = flatten_state_dict(load_object(TASK).build_model().state_dict())
    handed = []

    def pull_bigger(session: ClientSession) -> None:
        handed.append(session._drop_held(base.buffer.size + 4))
        handed.append(session._spare)

    _through_fedclient_run(base, _header(base, "fp32", {}), 1, pull_bigger)
    assert handed == [None, None]  # not handed over, and not kept either


def test_float_delta_is_the_difference_of_float_vectors_tensor_by_tensor() -> None:
    torch.manual_seed(0)
    state = {
        "a": torch.randn(3, 4),
        "h": torch.randn(5).to(torch.float16),
        "b": torch.randn(6).to(torch.bfloat16),
        "n": torch.tensor([3], dtype=torch.int64),
    }
    base = flatten_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    old = float_vector(flatten_state_dict(state)) - float_vector(base)
    assert np.array_equal(float_delta(state, base), old)
    assert float_delta_in_place(state, base) is None  # not float32 only: base untouched


def test_float_delta_in_place_consumes_a_float32_base() -> None:
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    base = flatten_state_dict({k: v * 0.5 for k, v in state.items()})
    expected = float_vector(flatten_state_dict(state)) - float_vector(base)
    delta = float_delta_in_place(state, base)
    assert delta is not None and np.shares_memory(delta, base.buffer)
    assert np.array_equal(delta, expected)


def test_a_disk_that_refuses_the_base_costs_memory_not_the_update(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full_disk(self: object, buffer: np.ndarray) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_memory._BaseFile, "save", full_disk)
    base = flatten_state_dict(load_object(TASK).build_model().state_dict())
    header = _header(base, "fp32", {})
    with caplog.at_level("WARNING", logger="fedclient"):
        sent = _through_fedclient_run(base, header, 3, bound=True)
    assert "keeping it in memory" in caplog.text
    assert sent == _through_fedclient_run(base, header, 3)
