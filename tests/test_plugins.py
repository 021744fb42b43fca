"""load_object: MODULE:ATTRIBUTE specs for tasks and strategies."""

from __future__ import annotations

import collections
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedcore.plugins import load_object

_COUNTER = itertools.count()


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a throwaway importable module; returns its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> str:
        name = f"_fedgrpc_plugin_{next(_COUNTER)}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_loads_a_module_attribute() -> None:
    assert load_object("math:pi") == math.pi
    assert load_object("collections:namedtuple") is collections.namedtuple


def test_loads_from_a_dotted_module() -> None:
    assert load_object("fedserver.strategies:build_strategy")("fedavg").name == "fedavg"


def test_class_is_instantiated() -> None:
    obj = load_object("collections:OrderedDict")
    assert isinstance(obj, collections.OrderedDict)
    assert obj == {}


def test_instance_is_returned_as_is(make_module: Callable[[str], str]) -> None:
    name = make_module(
        "class Task:\n    def __call__(self):\n        return 'called'\n\ntask = Task()\n"
    )
    obj = load_object(f"{name}:task")
    assert type(obj).__name__ == "Task"
    assert obj is sys.modules[name].task  # a callable instance is not called


def test_class_spec_gives_a_fresh_instance_each_time(make_module: Callable[[str], str]) -> None:
    name = make_module("class Task:\n    pass\n")
    first, second = load_object(f"{name}:Task"), load_object(f"{name}:Task")
    assert type(first) is sys.modules[name].Task
    assert first is not second


@pytest.mark.parametrize("spec", ["", "math", "math.pi", ":pi", "math:", ":", "examples/digits.py"])
def test_bad_spec_format_shows_the_expected_form(spec: str) -> None:
    with pytest.raises(
        ValueError, match=r"expected MODULE:ATTRIBUTE \(e\.g\. examples\.digits:task\)"
    ):
        load_object(spec)


def test_missing_module_names_it() -> None:
    with pytest.raises(
        ValueError,
        match=r"cannot import module 'no_such_mod_xyz' from "
        r"'no_such_mod_xyz:task'",
    ) as info:
        load_object("no_such_mod_xyz:task")
    assert isinstance(info.value.__cause__, ImportError)


def test_module_failing_to_import_is_reported(make_module: Callable[[str], str]) -> None:
    name = make_module("import no_such_dependency_xyz\n")
    with pytest.raises(ValueError, match=f"cannot import module '{name}'.*no_such_dependency_xyz"):
        load_object(f"{name}:task")


def test_missing_attribute_names_it() -> None:
    with pytest.raises(ValueError, match=r"module 'math' has no attribute 'tau_squared'"):
        load_object("math:tau_squared")


def test_function_is_returned_uncalled(make_module: Callable[[str], str]) -> None:
    name = make_module("def make_task():\n    return {'made': True}\n")
    assert load_object(f"{name}:make_task")() == {"made": True}


def test_finds_a_module_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with the `fedserver` console script: the working directory is not on sys.path."""
    name = f"_fedgrpc_cwd_{next(_COUNTER)}"
    (tmp_path / f"{name}.py").write_text("task = 'found'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert load_object(f"{name}:task") == "found"
    finally:
        sys.modules.pop(name, None)


def test_missing_module_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"looked for no_such_mod_xyz\.py or no_such_mod_xyz/ in "
        rf"the working directory {tmp_path} and on the Python path \(",
    ):
        load_object("no_such_mod_xyz:task")
