"""The key holder's part of homomorphic aggregation (`--secure he`, fedcore/he.py).

When the coordinator names this client in ModelHeader.decrypt_round, it downloads the round's
encrypted sum, decrypts it with the secret context and returns the plaintext *sum* (never an
individual update: the coordinator only asks for sums of at least two).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from fedcore import checksums
from fedcore.codecs import get_codec
from fedcore.he import HEClient, HEError
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import ManifestError
from fedcore.wire import manifest_from_proto, manifest_to_proto, update_stream

log = logging.getLogger("fedclient.he")
T = TypeVar("T")
Caller = Callable[[str, Callable[[], T]], T]


def decrypt_aggregate(
    stub: pb_grpc.CoordinatorStub,
    call: Caller,  # type: ignore[type-arg]
    he: HEClient,
    client_id: str,
    round_number: int,
    timeout: float,
    checksum: str = checksums.DEFAULT,
) -> None:
    """Download, decrypt and return one round's aggregate, its digest in `checksum` (the one
    the coordinator offered); a refusal is logged, not raised."""
    started = time.monotonic()
    try:
        header, payload = call(
            "encrypted aggregate", lambda: _download(stub, client_id, round_number, timeout)
        )
        manifest = manifest_from_proto(header.manifest)
        total = he.decrypt_payload(payload, sum(t.numel for t in manifest.tensors))
    except (HEError, ManifestError) as e:
        log.warning("round %d: cannot decrypt the aggregate: %s", round_number, e)
        return
    except grpc.RpcError as e:
        _log_refusal(round_number, e)
        return
    codec = get_codec("fp32")
    plain = codec.encode(total)
    update = pb.UpdateHeader(
        client_id=client_id,
        round=round_number,
        encoding=codec.name,
        manifest=manifest_to_proto(codec.wire_manifest(manifest)),
        total_bytes=plain.size,
        checksum=checksum,
    )
    digest = checksums.hexdigest(checksum, plain)
    try:
        call(
            "decryption",
            lambda: stub.SubmitDecryption(update_stream(update, plain, digest), timeout=timeout),
        )
    except grpc.RpcError as e:
        _log_refusal(round_number, e)
        return
    log.info(
        "round %d: decrypted the encrypted aggregate (%d bytes of ciphertext) in %.2fs",
        round_number,
        len(payload),
        time.monotonic() - started,
    )


def _download(
    stub: pb_grpc.CoordinatorStub, client_id: str, round_number: int, timeout: float
) -> tuple[pb.ModelHeader, bytes]:
    request = pb.EncryptedAggregateRequest(client_id=client_id, round=round_number)
    header: pb.ModelHeader | None = None
    parts: list[bytes] = []
    for msg in stub.GetEncryptedAggregate(request, timeout=timeout):
        if header is None:
            header = msg.header
        else:
            parts.append(msg.data)
    payload = b"".join(parts)
    if header is None or len(payload) != header.total_bytes:
        raise HEError("the encrypted aggregate arrived incomplete")
    return header, payload


def _log_refusal(round_number: int, e: grpc.RpcError) -> None:
    code = e.code()  # type: ignore[attr-defined]
    log.warning(
        "round %d: decryption not taken (%s: %s)",
        round_number,
        code.name,
        e.details(),  # type: ignore[attr-defined]
    )


__all__ = ["decrypt_aggregate"]
