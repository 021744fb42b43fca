"""Sending what a round produced: the update (SubmitUpdate, streamed) and an evaluation
(SubmitEvaluation), each through the session's retrying `call`, and what the coordinator's
refusals mean to the client. The counterpart of download.py; session.py decides when."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from fedclient.retry import PermanentError
from fedcore import faults
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.wire import ModelCalls, update_messages

log = logging.getLogger("fedclient")
T = TypeVar("T")
Call = Callable[[str, Callable[[], T]], T]  # ClientSession._call: retries transient failures

# Refusals that end only this round's try (the round closed, or the update was counted under
# another upload): the client goes on with the next round. Any other refusal ends the client.
_UPDATE_NOT_COUNTED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)
_EVALUATION_NOT_COUNTED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)


def submit_update(
    call: Call[Any],
    calls: ModelCalls,
    header: pb.UpdateHeader,
    payload: Any,
    timeout: float,
) -> pb.SubmitReply | None:
    """Upload one update; None, logged, when the coordinator did not count it."""

    def send() -> pb.SubmitReply:
        return calls.submit(_upload(header, payload), timeout=timeout)

    return _submit(call, "submit", "update", send, _UPDATE_NOT_COUNTED, header.round)


def submit_evaluation(
    call: Call[Any], stub: pb_grpc.CoordinatorStub, result: pb.EvaluationResult
) -> bool:
    """Report one evaluation; False, logged, when the coordinator did not count it."""

    def send() -> pb.EvaluationReply:
        return stub.SubmitEvaluation(result, timeout=30)

    counted = _submit(call, "evaluation", "evaluation", send, _EVALUATION_NOT_COUNTED, result.round)
    return counted is not None


def _submit(
    call: Call[Any],
    name: str,  # the call's, in the session's "<name> failed (...); retrying" lines
    what: str,
    send: Callable[[], T],
    not_counted: tuple[grpc.StatusCode, ...],
    round_number: int,
) -> T | None:
    try:
        return call(name, send)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()  # type: ignore[attr-defined]
        if code in not_counted:
            log.warning("round %d %s not counted: %s; moving on", round_number, what, details)
            return None
        raise PermanentError(f"coordinator refused the {what} ({code.name}): {details}") from None


def _upload(header: pb.UpdateHeader, payload: Any) -> Iterator[bytes]:
    for sent, chunk in enumerate(update_messages(header, payload)):
        yield chunk
        if sent == 1:  # header and first data chunk are out
            faults.freeze("upload", header.round)  # tests: stall mid-upload, to be killed
