"""Layered configuration: flag > FEDGRPC_* environment > TOML file > default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from fedclient.cli import build_parser as client_parser
from fedcore.config import ConfigError, layered_defaults, parse_layered
from fedserver.cli import build_parser as server_parser

TASK = "examples.digits:task"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FEDGRPC_"):
            monkeypatch.delenv(key)


def _server(argv: list[str]) -> argparse.Namespace:
    return parse_layered(server_parser(), argv, "server")


def _client(argv: list[str]) -> argparse.Namespace:
    return parse_layered(client_parser(), argv, "client")


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedgrpc.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    args = _server(["run", "--task", TASK])
    assert (args.command, args.task, args.rounds, args.round_timeout) == ("run", TASK, 20, 120.0)
    assert args.state_dir == Path("state")
    assert args.min_fit is None


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        (None, None, None, 20),
        (None, None, 3, 3),
        (None, "5", 3, 5),
        ("9", "5", 3, 9),
        ("9", None, 3, 9),
        ("9", "5", None, 9),
        (None, "5", None, 5),
    ],
)
def test_precedence_flag_env_file_default(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flag: str | None,
    env: str | None,
    file: int | None,
    expected: int,
) -> None:
    argv = ["run", "--task", TASK]
    if file is not None:
        argv += ["--config", str(_toml(tmp_path, f"[server]\nrounds = {file}\n"))]
    if env is not None:
        monkeypatch.setenv("FEDGRPC_ROUNDS", env)
    if flag is not None:
        argv += ["--rounds", flag]
    assert _server(argv).rounds == expected


def test_layers_combine_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(
        tmp_path,
        '[server]\nrounds = 3\nround-timeout = 7.5\nmin_clients = 4\nstate-dir = "from-file"\n'
        "[client]\nserver = 'ignored-by-the-server:1'\n",
    )
    monkeypatch.setenv("FEDGRPC_ROUND_TIMEOUT", "30")
    monkeypatch.setenv("FEDGRPC_STATE_DIR", "from-env")
    args = _server(["run", "--task", TASK, "--config", str(config), "--state-dir", "from-flag"])
    assert args.rounds == 3  # file
    assert args.min_clients == 4  # file, with an underscore key
    assert args.round_timeout == 30.0  # env beats file
    assert args.state_dir == Path("from-flag")  # flag beats env and file
    assert args.port == 50051  # default


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGRPC_CONFIG", str(_toml(tmp_path, "[server]\nport = 6000\n")))
    assert _server(["run", "--task", TASK]).port == 6000


def test_client_reads_its_own_table(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        '[server]\nrounds = 3\n[client]\nserver = "coord:50051"\ntask = "m:t"\n'
        'partition = "1/3"\nseed = 4\n',
    )
    args = _client(["run", "--config", str(config)])
    assert (args.server, args.task, args.partition, args.seed) == ("coord:50051", "m:t", "1/3", 4)


def test_required_task_satisfied_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGRPC_TASK", TASK)
    assert _server(["run"]).task == TASK
    monkeypatch.setenv("FEDGRPC_SERVER", "h:1")
    assert _client(["run"]).task == TASK


def test_required_task_missing_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _server(["run"])
    assert info.value.code == 2
    assert "--task" in capsys.readouterr().err


def test_unknown_key_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _toml(tmp_path, "[server]\nrounds = 3\nround-timout = 60\n")
    with pytest.raises(SystemExit) as info:
        _server(["run", "--task", TASK, "--config", str(config)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'round-timout' in [server]" in err
    assert "allowed:" in err and "round-timeout" in err


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("FEDGRPC_JSON", "maybe", "FEDGRPC_JSON must be true or false, got 'maybe'"),
        ("FEDGRPC_PORT", "http", "bad value 'http' for FEDGRPC_PORT"),
        ("FEDGRPC_ROUND_TIMEOUT", "soon", "bad value 'soon' for FEDGRPC_ROUND_TIMEOUT"),
        ("FEDGRPC_LOG_LEVEL", "loud", "FEDGRPC_LOG_LEVEL must be one of debug, info"),
    ],
)
def test_bad_environment_values_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(env, value)
    command = ["status"] if env == "FEDGRPC_JSON" else ["run", "--task", TASK]
    with pytest.raises(SystemExit) as info:
        _server(command)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_file_values_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _toml(tmp_path, '[server]\nport = "eighty"\n')
    with pytest.raises(SystemExit):
        _server(["run", "--task", TASK, "--config", str(config)])
    assert f"{config}: bad value 'eighty' for port" in capsys.readouterr().err

    config = _toml(tmp_path, '[server]\njson = "sometimes"\n')
    with pytest.raises(SystemExit):
        _server(["status", "--config", str(config)])
    assert "json must be true or false" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"), [("1", True), ("YES", True), ("on", True), ("0", False), ("", False)]
)
def test_boolean_environment_values(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: bool
) -> None:
    monkeypatch.setenv("FEDGRPC_JSON", text)
    assert _server(["status"]).json is expected


def test_boolean_file_value(tmp_path: Path) -> None:
    config = _toml(tmp_path, "[server]\njson = true\n")
    assert _server(["status", "--config", str(config)]).json is True


def test_invalid_toml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _server(["status", "--config", str(_toml(tmp_path, "[server\n"))])
    assert "is not valid TOML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _server(["status", "--config", str(tmp_path / "missing.toml")])
    assert "cannot read config file" in capsys.readouterr().err


def test_layered_defaults_uses_the_given_environment() -> None:
    (sub,) = [a for a in server_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    run = sub.choices["run"]
    defaults = layered_defaults(run, None, "server", {"FEDGRPC_SEED": "7", "OTHER": "x"})
    assert defaults == {"seed": 7}
    with pytest.raises(ConfigError, match="FEDGRPC_SEED"):
        layered_defaults(run, None, "server", {"FEDGRPC_SEED": "x"})


def test_out_of_range_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _server(["run", "--task", TASK, "--rounds", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["env", "file"])
def test_out_of_range_env_or_file_value_is_a_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
) -> None:
    argv = ["run", "--task", TASK]
    if source == "env":
        monkeypatch.setenv("FEDGRPC_ROUNDS", "0")
    else:
        argv += ["--config", str(_toml(tmp_path, "[server]\nrounds = 0\n"))]
    with pytest.raises(SystemExit):
        _server(argv)
    assert "must be at least 1, got 0" in capsys.readouterr().err
