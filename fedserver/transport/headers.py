"""The coordinator's messages as protobuf, built and parsed in one place (no grpc here).

Both transports call these: the gRPC servicer (service.py) and the in-process one the
simulation uses (fedserver/simulation/inprocess.py), so a virtual client receives exactly the
ModelHeader a `fedclient` process would, and its UpdateHeader is checked by the same code.
`model_header` turns an Offer into the header a poll is answered with; `parse_update_header`
checks every bound of an UpdateHeader before converting it; the `check_*` functions are the
field checks those and the servicer's other RPCs share.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from fedcore import limits
from fedcore.checksums import LEGACY as LEGACY_CHECKSUM
from fedcore.limits import MAX_CLIENT_ID, excerpt
from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import ManifestError
from fedcore.wire import manifest_from_proto, manifest_to_proto
from fedserver.coordinator.offers import Offer
from fedserver.updates.messages import SubmitHeader
from fedserver.updates.receiver import BadUpdate

STATES = {
    "waiting_for_clients": pb.WAITING_FOR_CLIENTS,
    "training": pb.TRAINING,
    "finished": pb.FINISHED,
    "shutting_down": pb.SHUTTING_DOWN,
}


class ModelHeaders:
    """Builds the ModelHeader answering a poll. The model's manifest is converted once per
    version and not per header: with every one of 10,000 clients selected, per-call
    conversion was 10,000 copies."""

    def __init__(self, total_rounds: int) -> None:
        self.total_rounds = total_rounds
        self._manifest: tuple[str, pb.Manifest] | None = None  # (model version, its manifest)

    def manifest(self, offer: Offer) -> pb.Manifest:
        version = offer.model.version
        if self._manifest is None or self._manifest[0] != version:
            self._manifest = (version, manifest_to_proto(offer.model.manifest))
        return self._manifest[1]

    def build(self, offer: Offer) -> pb.ModelHeader:
        cfg = offer.config
        header = pb.ModelHeader(
            state=STATES[offer.state],
            round=offer.round,
            selected=offer.selected,
            total_rounds=self.total_rounds,
            deadline_seconds=offer.deadline_seconds,
            message=offer.message,
        )
        if offer.selected or offer.evaluate_round:
            header.model_version = offer.model.version
            header.manifest.CopyFrom(self.manifest(offer))
            if offer.send_bytes:
                header.total_bytes = offer.model.buffer.size
                header.model_checksum = offer.model.checksum
            header.evaluate_round = offer.evaluate_round
        header.decrypt_round = offer.decrypt_round
        if offer.strategy_tensors is not None:
            extra = offer.strategy_tensors
            header.strategy_manifest.CopyFrom(manifest_to_proto(extra.manifest))
            header.strategy_version = extra.version
            header.strategy_bytes = extra.buffer.size
            header.strategy_checksum = extra.checksum
        if offer.selected:
            header.config.CopyFrom(
                pb.RoundConfig(
                    local_epochs=int(cfg["local_epochs"]),  # type: ignore[call-overload]
                    lr=float(cfg["lr"]),  # type: ignore[arg-type]
                    batch_size=int(cfg["batch_size"]),  # type: ignore[call-overload]
                    encoding=str(cfg["encoding"]),
                    extra=dict(cfg["extra"]),  # type: ignore[call-overload]
                )
            )
        return header


def parse_update_header(h: pb.UpdateHeader, max_tensors: int) -> SubmitHeader:
    """An UpdateHeader as the coordinator's SubmitHeader; raises BadUpdate (not yet counted:
    the caller hands it to `reject`). Every bound is checked before the manifest or the
    metrics are converted."""
    if problem := check_client_id(h.client_id):
        raise BadUpdate(problem, "bad_client_id")
    if problem := check_strings(h):
        raise BadUpdate(problem, "malformed")
    if problem := check_metrics(h.metrics):
        raise BadUpdate(problem, "bad_metrics")
    try:
        manifest = manifest_from_proto(h.manifest, max_tensors)
    except (ManifestError, ValueError) as e:
        raise BadUpdate(f"invalid manifest: {e}", reason="bad_manifest") from None
    return SubmitHeader(
        client_id=h.client_id,
        round=h.round,
        base_version=h.base_version,
        num_examples=h.num_examples,
        metrics=dict(h.metrics),
        encoding=h.encoding or "fp32",
        manifest=manifest,
        total_bytes=h.total_bytes,
        checksum=h.checksum or LEGACY_CHECKSUM,
    )


def check_client_id(client_id: str) -> str | None:
    if not client_id:
        return "client_id is required"
    if len(client_id) > MAX_CLIENT_ID or not client_id.isprintable():
        return (
            f"client_id must be printable and at most {MAX_CLIENT_ID} characters, got "
            f"{excerpt(client_id)}"
        )
    return None


def check_strings(message: Any, skip: tuple[str, ...] = ("client_id",)) -> str | None:
    """Why a singular string field of `message` exceeds limits.MAX_STRING, or None."""
    for field in message.DESCRIPTOR.fields:
        if field.type != FieldDescriptor.TYPE_STRING or field.name in skip:
            continue
        if _is_repeated(field):
            continue
        value = getattr(message, field.name)
        if len(value) > limits.MAX_STRING:
            return f"{field.name} exceeds {limits.MAX_STRING} characters ({len(value)})"
    return None


def check_metrics(metrics: Any) -> str | None:
    """Why a client's metrics map breaks the limits (count, name length) or uses a name the
    coordinator keeps for itself, or None."""
    problem = limits.check_string_map(metrics, "metrics", limits.MAX_METRICS, limits.MAX_METRIC_KEY)
    return problem or limits.reserved_metric(metrics)


def check_properties(properties: Any) -> str | None:
    return limits.check_string_map(
        properties,
        "properties",
        limits.MAX_PROPERTIES,
        limits.MAX_PROPERTY_KEY,
        limits.MAX_PROPERTY_VALUE,
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has is_repeated; label is deprecated there but still present before.
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return field.label == FieldDescriptor.LABEL_REPEATED
