"""Every CLI flag can also come from a FEDGRPC_* environment variable or a TOML file.

Precedence: command-line flag > environment variable > config file > built-in default.
`--rounds` is FEDGRPC_ROUNDS in the environment and `rounds = 20` in the file's [server] (or
[client]) table. Unknown keys are errors that name the key and the allowed ones; keys of a
sibling subcommand (`tls-cert` of `fedserver run` read by `fedserver status`) are skipped, so
one [server] table serves every subcommand.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

ENV_PREFIX = "FEDGRPC_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    pass


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class CliParser(argparse.ArgumentParser):
    """argparse's parser with errors a person can act on: the error line first, the closest
    flag to a mistyped one, and a pointer to --help instead of 30 lines of usage. Subcommands
    made with add_subparsers().add_parser() are CliParsers too."""

    command: argparse.ArgumentParser | None = None  # the subcommand argv names (parse_layered)
    argv: Sequence[str] = ()  # what was parsed: a typo shows up before a missing --task

    def error(self, message: str) -> NoReturn:
        source = self.command or self
        lines = [f"{self.prog}: error: {message}"]
        known = [o for a in source._actions for o in a.option_strings]
        words = [*self.argv, *message.split(":", 1)[-1].split()]
        flags = dict.fromkeys(w.split("=", 1)[0].strip(",") for w in words if w.startswith("--"))
        for flag in flags:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if flag not in known and close:
                lines.append(f"{flag}: did you mean {close[0]}?")
        lines.append(f"see `{source.prog} --help`")
        self.exit(2, "\n".join(lines) + "\n")


def quiet_broken_pipe(main: Callable[[], int]) -> int:
    """Run a CLI's main; a reader that stops early (`fedserver status | head -2`) ends it
    quietly, with the status of a process killed by SIGPIPE, instead of a traceback."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE


BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`'s yes


class Repeatable(argparse.Action):
    """A flag given once per value (`--track A --track B`). The environment (values separated
    by spaces) and the file (a TOML list) set it as a tuple; the first value on the command
    line replaces those instead of adding to them, as every flag overrides its environment."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", ())
        super().__init__(option_strings, dest, nargs=None, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        given = current if isinstance(current, list) else []  # a list: from this command line
        setattr(namespace, self.dest, [*given, values])


def _settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.dest: a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config", "version")
    }


def _convert(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    if isinstance(action, Repeatable):
        items = value if isinstance(value, list) else str(value).split()
        return tuple(_convert_one(action, key, v, source) for v in items)
    return _convert_one(action, key, value, source)


def _convert_one(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    try:
        converted = action.type(str(value)) if action.type else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{source}: bad value {value!r} for {key}: {e}") from None
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        raise ConfigError(f"{source}: {key} must be one of {allowed}, got {value!r}")
    return converted


def layered_defaults(
    parser: argparse.ArgumentParser,
    config_file: Path | None,
    section: str,
    environ: Mapping[str, str] = os.environ,
    sibling_keys: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Defaults for `parser` from the config file, overridden by the environment.

    `sibling_keys` are flags of the program's other subcommands: one [server] table serves
    `fedserver run`, `status`, `report`..., so each skips the keys that belong to another.
    """
    actions = _settable(parser)
    out: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {config_file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{config_file} is not valid TOML: {e}") from None
        table = data.get(section, {k: v for k, v in data.items() if not isinstance(v, dict)})
        for raw_key, value in table.items():
            key = raw_key.replace("-", "_")
            if key not in actions and key in sibling_keys:
                continue
            if key not in actions:
                allowed = ", ".join(sorted(k.replace("_", "-") for k in actions))
                raise ConfigError(
                    f"{config_file}: unknown key {raw_key!r} in [{section}]; allowed: {allowed}"
                )
            out[key] = _convert(actions[key], raw_key, value, str(config_file))
    for key, action in actions.items():
        env = ENV_PREFIX + key.upper()
        if env in environ:
            out[key] = _convert(action, env, environ[env], "environment")
    return out


def parse_layered(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str
) -> argparse.Namespace:
    """Parse argv with file and environment defaults applied underneath the flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    target = parser
    siblings: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            command = next((a for a in argv if not a.startswith("-")), None)
            if command in action.choices:
                target = action.choices[command]
            for sub in action.choices.values():
                siblings |= _settable(sub).keys()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=os.environ.get(ENV_PREFIX + "CONFIG"))
    known, _ = pre.parse_known_args(argv)
    try:
        defaults = layered_defaults(target, known.config, section, sibling_keys=frozenset(siblings))
    except ConfigError as e:
        target.error(str(e))
    for each in (parser, target):
        if isinstance(each, CliParser):
            each.argv = argv
            if each is parser and target is not parser:
                each.command = target  # a mistyped flag is looked up among this command's
    target.set_defaults(**defaults)
    # Values from file/env satisfy required flags.
    for action in target._actions:
        if action.dest in defaults:
            action.required = False
    return parser.parse_args(argv)
