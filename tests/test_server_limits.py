"""The connection limits are flags like any other (flag > FEDGRPC_* > TOML > default), refused
when out of range, and the queue gRPC keeps before authentication is proportionate (it was 1M
calls for an hour). Pure: parsing and settings, no server."""

from __future__ import annotations

import os

import pytest

from fedcore.config import parse_layered
from fedserver.cli import build_parser
from fedserver.commands.run import serve_settings
from fedserver.transport.downloads import DownloadLimits, Downloads, TooManyPulls
from fedserver.transport.limits import CallQueue
from fedserver.transport.server import SERVER_OPTIONS

TASK = "examples.digits:task"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FEDGRPC_"):
            monkeypatch.delenv(key)


def _options(settings_queue: CallQueue) -> dict[str, int]:
    return dict((*SERVER_OPTIONS, *settings_queue.server_options()))


def test_defaults_bound_the_queue_before_authentication() -> None:
    s = serve_settings(parse_layered(build_parser(), ["run", "--task", TASK], "server"))
    options = _options(s.call_queue)
    assert options["grpc.server.max_pending_requests"] == 20_000
    assert options["grpc.server.max_pending_requests_hard_limit"] == 20_000
    assert options["grpc.server_max_unrequested_time_in_server"] == 120
    limits = s.downloads
    assert (limits.max_sends, limits.pulls_per_client, limits.stall_timeout) == (256, 2, 30.0)


def test_limits_come_from_flags_environment_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("FEDGRPC_MAX_PULLS_PER_CLIENT", "1")
    config = f"{tmp_path}/fedgrpc.toml"
    with open(config, "w") as f:
        f.write("[server]\nsend-stall-timeout = 5.5\nmax-queued-calls = 50000\n")
    argv = ["run", "--task", TASK, "--config", config, "--max-model-sends", "8"]
    s = serve_settings(parse_layered(build_parser(), argv, "server"))
    assert (s.downloads.max_sends, s.downloads.pulls_per_client) == (8, 1)
    assert s.downloads.stall_timeout == 5.5
    assert _options(s.call_queue)["grpc.server.max_pending_requests"] == 50_000


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-pulls-per-client", "0", "must be at least 1, got 0"),
        ("--max-model-sends", "-3", "must be at least 1, got -3"),
        ("--send-stall-timeout", "0", "must be positive, got 0.0"),
        ("--max-queued-calls", "0", "must be at least 1, got 0"),
        ("--queued-call-timeout", "0", "must be at least 1, got 0"),
    ],
)
def test_out_of_range_limits_are_usage_errors(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_layered(build_parser(), ["run", "--task", TASK, flag, value], "server")
    err = capsys.readouterr().err
    assert flag in err and message in err


def test_download_counts_are_per_client_and_leave_no_zero_entries() -> None:
    refused: list[Exception] = []
    downloads = Downloads(DownloadLimits(pulls_per_client=2), refused.append)
    with downloads.pull("a"), downloads.pull("a"), downloads.pull("b"):
        assert dict(downloads.pulls) == {"a": 2, "b": 1}
        with pytest.raises(TooManyPulls, match="already has 2 model downloads open"):
            downloads.pull("a")
    assert dict(downloads.pulls) == {}
    with pytest.raises(RuntimeError), downloads.pull("a"):
        raise RuntimeError("the handler failed")  # released however the download ends
    assert dict(downloads.pulls) == {}
