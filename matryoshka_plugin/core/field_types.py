"""Checking a config dict read from a file against a dataclass's typed fields.

simple_parsing's ``from_dict`` coerces or drops ill-typed values without a word (3
becomes True, "8" becomes 8, a list for an int fails deep inside); these checks name
the field instead. Plain Python: used by every config-file and ``cfg.json`` reader.
"""

import types
import typing
from dataclasses import fields, is_dataclass


def config_problems(cls, data: dict, path: str = "", *, known_only: bool = False) -> list[str]:
    """Unknown keys and ill-typed or out-of-choice values in a config dict, recursively.

    Flags are checked by argparse; values read from a file are checked here, so the
    message names the field. ``known_only`` skips unknown keys (sparsify's own loaders
    drop them, as a saved ``cfg.json`` may carry extra metadata).
    """
    by_name = {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in data.items():
        hint = hints.get(key)
        if key not in by_name:
            if not known_only:
                problems.append(f"unknown field {path}{key}")
        elif is_dataclass(hint) and isinstance(value, dict):
            problems += config_problems(hint, value, f"{path}{key}.", known_only=known_only)
        elif typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            allowed = ", ".join(map(str, typing.get_args(hint)))
            problems.append(f"{path}{key}={value!r} is not allowed; allowed: {allowed}")
        elif (expected := _type_problem(hint, value)) is not None:
            problems.append(f"{path}{key}={value!r} is not allowed; expected {expected}")
    return problems


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar_ok(tp, value) -> bool:
    # simple_parsing would turn 3 into True and "8" into 8 without a word; a config
    # file holds typed JSON/YAML values, so take them only as their own type.
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_problem(hint, value) -> str | None:
    """What ``value`` should have been, if it does not fit a simple ``hint``; else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or len(args) != 1:
            return None
        hint = args[0]
        args = list(typing.get_args(hint))
    if hint in _SCALARS:
        return None if _scalar_ok(hint, value) else _SCALARS[hint]
    if typing.get_origin(hint) is list and len(args) == 1 and args[0] in _SCALARS:
        ok = isinstance(value, list) and all(_scalar_ok(args[0], v) for v in value)
        return None if ok else f"a list of {_SCALARS[args[0]].removeprefix('a ').removeprefix('an ')}s"
    return None
