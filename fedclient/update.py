"""One client update, from the pulled model to the bytes that leave this client.

pull (done by the caller) -> local update -> personal tensors kept -> privatize -> encode ->
UpdateHeader. The one pipeline behind both `fedclient run` (session.py, which adds the RPCs,
retries, progress bar and --slowdown around it) and the simulation's virtual clients
(virtual.py), so a virtual client's update is, byte for byte, the one a `fedclient` process
with the same seed, round header and data would send (tests/test_simulation_driver.py).

Two steps, so that `fedclient run` can do its own things between them (a progress bar during
`train`, --slowdown and stop checks before `encode`); `prepare_update` chains them for a
virtual client, with the state a `fedclient` process keeps in memory (personal tensors, the
error-feedback residual) handed in and updated as the session updates its own (state.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedclient.local_update import (
    clip_bit,
    local_update,
    privatize,
    report_clip_bit,
    round_seed,
)
from fedclient.model_memory import BoundModel
from fedclient.protocols.handlers import RoundHandler
from fedclient.retry import PermanentError
from fedclient.scaffold import ControlVariate, corrected_steps
from fedclient.state import ClientState
from fedclient.task import LocalData, Task, TrainConfig, TrainResult
from fedcore import checksums
from fedcore.codecs import get_codec
from fedcore.proto import coordinator_pb2 as pb
from fedcore.scaffold import exchanged, is_scaffold_round
from fedcore.selection import Selection
from fedcore.tensors import FlatModel, Manifest
from fedcore.wire import update_header


@dataclass(frozen=True)
class RoundTensors:
    """What a round trains, what it sends, and which tensors stay here (FedPer, or None)."""

    trained: Selection
    sent: Selection
    personal: Selection | None = None


@dataclass(frozen=True)
class Trained:
    """A local update, not yet encoded."""

    config: TrainConfig
    tensors: RoundTensors
    result: TrainResult
    vector: np.ndarray  # float32 update over every float tensor, manifest order (SCAFFOLD: + Δc)
    personal: dict[str, Any] | None  # the personal tensors as trained now, to keep; None: none
    control: np.ndarray | None = None  # SCAFFOLD: c_i⁺, to keep once the update is counted


@dataclass(frozen=True)
class PreparedUpdate:
    """An update as it travels: UpdateHeader and encoded payload. A `fedclient` upload takes
    the trailer's digest as it streams (wire.update_messages); `digest` is for the callers
    that hand the update over whole (virtual clients)."""

    header: pb.UpdateHeader
    payload: np.ndarray
    result: TrainResult
    pending: Path | None = None  # SCAFFOLD, virtual client: c_i⁺, for scaffold.settle

    @property
    def digest(self) -> str:
        return checksums.hexdigest(self.header.checksum, self.payload)


def train_config(header: pb.ModelHeader, seed: int, client_id: str) -> TrainConfig:
    """The round's settings from its header; the task's defaults where it sends none."""
    cfg = header.config
    return TrainConfig(
        local_epochs=cfg.local_epochs or 1,
        lr=cfg.lr or 0.05,
        batch_size=cfg.batch_size or 32,
        seed=round_seed(seed, client_id, header.round),
        extra=dict(cfg.extra),
    )


def round_tensors(floats: Manifest, config: TrainConfig, personal_patterns: str) -> RoundTensors:
    """The round names what is trained and sent (--train-tensors on the coordinator); FedPer
    personal tensors (`personal_patterns`) are trained every round but never leave this client.
    """
    if is_scaffold_round(config.extra):
        if personal_patterns:
            raise PermanentError(
                "the coordinator runs --strategy scaffold, whose control variates cover every "
                "tensor; this client keeps personal tensors (--personal-tensors or the task's "
                "personal_tensors), which it cannot combine with"
            )
        every = Selection.everything(floats)
        return RoundTensors(every, Selection.everything(exchanged(floats)))
    names = config.train_tensors
    round_sel = Selection.of_names(floats, names) if names else Selection.everything(floats)
    if not personal_patterns:
        return RoundTensors(round_sel, round_sel)
    personal = Selection.matching(floats, personal_patterns)
    sent = round_sel.without(personal)
    if not sent.indices:
        raise PermanentError(
            "every tensor trained this round is personal (--personal-tensors); "
            "nothing would be sent"
        )
    return RoundTensors(round_sel.union(personal), sent, personal)


def train(
    task: Task,
    model: Any,
    data: LocalData,
    base: FlatModel,
    config: TrainConfig,
    tensors: RoundTensors,
    kept: dict[str, Any] | None = None,
    control: tuple[np.ndarray, np.ndarray] | None = None,
    consume_base: bool = False,
    in_place: BoundModel | None = None,
) -> Trained:
    """Local update from `base`; `kept`: this client's personal tensors from last round;
    `control`: SCAFFOLD's (c, c_i), which correct every step (fedclient/scaffold.py).
    `consume_base`: the caller drops `base` after this; `in_place`: `model` is `base`'s buffer,
    saved (see local_update)."""
    personal = tensors.personal
    kept = kept if personal is not None else None
    if control is not None:
        c, c_i = control
        floats = base.manifest.floats()
        with corrected_steps(model, floats, c - c_i) as grads:
            result, vector = local_update(task, model, data, base, config, tensors.trained, kept)
        c_plus = grads.mean()
        return Trained(
            config, tensors, result, np.concatenate([vector, c_plus - c_i]), None, c_plus
        )
    result, vector = local_update(
        task,
        model,
        data,
        base,
        config,
        tensors.trained,
        kept,
        consume_base=consume_base,
        in_place=in_place,
    )
    now = None
    if personal is not None:
        state = model.state_dict()
        now = {n: state[n].detach().clone() for n in personal.names}
    return Trained(config, tensors, result, vector, now)


def encode(
    trained: Trained,
    handler: RoundHandler,
    client_id: str,
    header: pb.ModelHeader,
    encoding: str = "",
    checksum: str = checksums.DEFAULT,
) -> PreparedUpdate:
    """Privatize (DP: clip, noise, as the round config says), encode, and build the header
    (the update is based on `header.model_version`, the model the caller trained from),
    digested in `checksum` (the one the coordinator offered: checksums.choose).

    The round's encoding unless this client asks for its own (`encoding`, --encoding); the
    coordinator accepts any codec it knows, declared in the update header. Secure aggregation
    rounds must stay masked-u64, homomorphic ones he-ckks (`handler.fixed_encoding`)."""
    config, sent, result = trained.config, trained.tensors.sent, trained.result
    wanted = "" if handler.fixed_encoding else encoding
    delta = sent.extract(trained.vector)
    bit = clip_bit(delta, config.extra)
    delta = privatize(delta, config.extra)
    delta, manifest, report = report_clip_bit(bit, delta, sent.manifest, config.extra)
    reported = result.metrics | report
    codec = get_codec(wanted or header.config.encoding or "fp32").bind(manifest)
    payload = handler.encode(codec, delta, result.num_examples, config.extra)
    update = update_header(
        client_id,
        header.round,
        header.model_version,
        result.num_examples,
        reported,
        codec.name,
        codec.wire_manifest(manifest),
        payload,
        checksum,
    )
    return PreparedUpdate(update, payload, result)


def prepare_update(
    task: Task,
    model: Any,
    data: LocalData,
    base: FlatModel,
    header: pb.ModelHeader,
    client_id: str,
    *,
    seed: int,
    state: ClientState,
    personal_patterns: str = "",
    encoding: str = "",
    sent: tuple[int, FlatModel] | None = None,
    federation_id: str = "",
) -> PreparedUpdate:
    """The whole pipeline of a plain round, as session.py runs it: train from `base` with this
    client's personal tensors (`state.personal`), keep the ones trained now, encode with its
    error feedback (`state.feedback`, whose residual the codec updates). `state` is updated
    in place; the caller keeps it for the client's next round.

    A SCAFFOLD round corrects the steps with (c, c_i): c from `sent` (the (round, c) the header
    carried), c_i from `state.control` for `federation_id`; c_i⁺ is written pending
    (`PreparedUpdate.pending`) for the caller to settle once the update is counted."""
    config = train_config(header, seed, client_id)
    tensors = round_tensors(base.manifest.floats(), config, personal_patterns)
    keeper = state.control or ControlVariate(None, client_id)
    control = keeper.for_round(config.extra, header.round, sent, base, federation_id)
    trained = train(task, model, data, base, config, tensors, state.personal, control)
    if trained.personal is not None:
        state.personal = trained.personal
    prepared = encode(trained, RoundHandler(state.feedback), client_id, header, encoding)
    if trained.control is None:
        return prepared
    floats = base.manifest.floats()
    pending = keeper.commit(federation_id, floats, trained.control, pending=True)
    return replace(prepared, pending=pending)
