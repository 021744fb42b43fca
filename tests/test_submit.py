"""fedclient/submit.py: which refusals of a submission end only the round (logged, the client
goes on) and which end the client (PermanentError, with the coordinator's reason). Unit tests:
the stub raises as grpc would; integration tests (test_netns.py, test_fedeval.py) send real ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from fedclient.retry import PermanentError
from fedclient.submit import submit_evaluation, submit_update
from fedcore.proto import coordinator_pb2 as pb


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "round 7 is closed"


class _Stub:
    def __init__(self, refusal: grpc.StatusCode | None) -> None:
        self.refusal = refusal

    def SubmitEvaluation(self, result: pb.EvaluationResult, timeout: float) -> pb.EvaluationReply:
        if self.refusal is not None:
            raise _Refusal(self.refusal)
        return pb.EvaluationReply()


def _direct(what: str, fn: Callable[[], Any]) -> Any:  # the session's retrying call, minus retries
    return fn()


RESULT = pb.EvaluationResult(client_id="c-1", round=7, num_examples=3)


def test_an_evaluation_counted_says_so() -> None:
    assert submit_evaluation(_direct, _Stub(None), RESULT) is True  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED]
)
def test_an_evaluation_of_a_closed_round_is_logged_and_the_client_goes_on(
    code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedclient"):
        assert submit_evaluation(_direct, _Stub(code), RESULT) is False  # type: ignore[arg-type]
    assert "round 7 evaluation not counted: round 7 is closed" in caplog.text


def test_any_other_refusal_ends_the_client_with_the_coordinators_reason() -> None:
    with pytest.raises(PermanentError, match=r"refused the evaluation \(INVALID_ARGUMENT\)"):
        submit_evaluation(_direct, _Stub(grpc.StatusCode.INVALID_ARGUMENT), RESULT)  # type: ignore[arg-type]


class _Calls:
    def submit(self, messages: Any, timeout: float) -> pb.SubmitReply:
        raise _Refusal(grpc.StatusCode.ALREADY_EXISTS)


def test_an_update_counted_under_another_upload_is_logged_and_the_client_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    header = pb.UpdateHeader(client_id="c-1", round=7)
    with caplog.at_level(logging.WARNING, logger="fedclient"):
        assert submit_update(_direct, _Calls(), header, None, 5.0) is None  # type: ignore[arg-type]
    assert "round 7 update not counted: round 7 is closed; moving on" in caplog.text
