"""The options of ``sparsify-matryoshka``, and the strict reading of its config files.

``MatryoshkaRunConfig`` is sparsify's own CLI config (``sparsify.__main__.RunConfig``)
with the ``sae`` section widened to ``MatryoshkaSparseCoderConfig`` and a ``device``
option. ``read_config_file`` reads a JSON or YAML file of it, refusing unknown fields
and ill-typed values by name (simple_parsing would coerce or drop them silently).
"""

import argparse
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from sparsify.__main__ import RunConfig

from ...core import MatryoshkaConfigError
from ...core.errors import UsageError
from .coder import MatryoshkaSparseCoderConfig


@dataclass
class MatryoshkaRunConfig(RunConfig):
    sae: MatryoshkaSparseCoderConfig = field(default_factory=MatryoshkaSparseCoderConfig)
    """Sparse coder options, sparsify's plus the Matryoshka ones."""

    device: str = "auto"
    """Device to train on: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""


def config_problems(cls, data: dict, path: str = "") -> list[str]:
    """Unknown keys and out-of-choice ``Literal`` values in a config dict, recursively.

    Flags are checked by argparse; values read from a file are checked here, so the
    message names the field.
    """
    by_name = {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in data.items():
        hint = hints.get(key)
        if key not in by_name:
            problems.append(f"unknown field {path}{key}")
        elif is_dataclass(hint) and isinstance(value, dict):
            problems += config_problems(hint, value, f"{path}{key}.")
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


def read_config_file(path: str) -> MatryoshkaRunConfig:
    """A run config from a JSON or YAML file, strictly checked."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config_path {path}: no such file")
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"--config_path {path} does not parse: {first}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config_path {path} must hold a mapping of config fields")
    if problems := config_problems(MatryoshkaRunConfig, data):
        raise UsageError(f"--config_path {path}: {'; '.join(problems)}")
    # sparsify's Trainer writes the hookpoints it derived from `layers` (already
    # strided) back into the config it saves; feeding that file back in would trip its
    # own assert, or stride the hookpoints a second time.
    if data.get("layers") and data.get("hookpoints"):
        data.pop("layers")
        data["layer_stride"] = 1
    try:
        return MatryoshkaRunConfig.from_dict(data)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        if isinstance(e, MatryoshkaConfigError):
            raise
        raise UsageError(f"--config_path {path}: {e}") from None
