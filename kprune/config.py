"""Configs as YAML files that are small diffs from a base: ``base: other.yaml`` is read first (its
path relative to the file), then the file's own keys replace the base's, nested dicts merged key by
key.

Every config section is a :func:`schema`: a dataclass validated by pydantic, which converts values
to the field types (YAML 1.1 reads ``1e-3`` as a string) and refuses unknown keys; cross-field rules
live in the class's ``__post_init__``. :func:`build` turns pydantic's report into one line naming
the file, the key, the value and what was expected, and lists the known keys for an unknown one.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Type, TypeVar

from typing_extensions import Annotated

import pydantic
import pydantic.dataclasses
import yaml

from kprune.fileio import write_bytes_atomic

T = TypeVar("T")


def _merge(base: Dict[str, Any], diff: Mapping[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in diff.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> Dict[str, Any]:
    """A YAML mapping with its ``base:`` chain resolved.

    Raises:
        ValueError: missing file, invalid YAML, not a mapping, or a ``base:`` cycle.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ValueError(f"{path}: base chain loops back to itself")
    if not path.is_file():
        raise ValueError(f"config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)


_FORBID_EXTRA = pydantic.ConfigDict(extra="forbid")


def _not_bool(value):
    if isinstance(value, bool):  # pydantic would read true as 1: a number key given a yes/no is a mistake
        raise ValueError("expected a number, not true or false")
    return value


# Field types of numbers that refuse true / false (YAML's yes, no, on, off too).
Int = Annotated[int, pydantic.BeforeValidator(_not_bool)]
Float = Annotated[float, pydantic.BeforeValidator(_not_bool)]


def schema(cls: Type[T] = None, *, frozen: bool = False):
    """Class decorator: a dataclass whose constructor validates and converts its arguments by the
    field types and refuses unknown keywords (raising :class:`pydantic.ValidationError`, a
    ``ValueError``). ``dataclasses.fields``, ``asdict`` and ``replace`` work on it as on any dataclass."""
    decorate = pydantic.dataclasses.dataclass(frozen=frozen, config=_FORBID_EXTRA)
    return decorate if cls is None else decorate(cls)


def strict_keys(cls: Type[T]) -> Type[T]:
    """Class decorator for a ``TypedDict`` nested in a :func:`schema`: its values are validated by
    their types, and keys it does not declare are refused."""
    return pydantic.with_config(_FORBID_EXTRA)(cls)


def _keys_at(cls, path: List[str]) -> List[str]:
    """The keys of the schema class or TypedDict found at ``path`` (field names, list indices and
    mapping keys) below ``cls``."""
    kind = cls
    for part in path:
        hints = typing.get_type_hints(kind) if isinstance(kind, type) else {}
        if part in hints:
            kind = hints[part]
        else:  # an item of List[X], a value of Dict[str, X], the X of Optional[X]
            kind = [a for a in typing.get_args(kind) if a is not type(None)][-1]
        while typing.get_origin(kind) is typing.Union:
            kind = [a for a in typing.get_args(kind) if a is not type(None)][-1]
    return list(typing.get_type_hints(kind))


_EXPECTED = {  # pydantic error types -> what the key expects, in the words of our messages
    "float_parsing": "expected a number", "float_type": "expected a number",
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number", "bool_parsing": "expected true or false",
    "bool_type": "expected true or false", "string_type": "expected a string",
    "list_type": "expected a list", "tuple_type": "expected a list", "dict_type": "expected a mapping",
    "missing": "missing", "too_long": "too many values", "too_short": "too few values",
}


def _describe(error: pydantic.ValidationError, cls) -> str:
    unknown, problems = {}, {}
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if item["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.setdefault(tuple(loc[:-1]), []).append(loc[-1])
        elif item["type"] == "value_error":  # raised by a __post_init__ (its own words) or a field check
            said = str(item["ctx"]["error"])
            problems.setdefault(".".join(loc), f"{'.'.join(loc)} = {item['input']!r}: {said}" if loc else said)
        else:
            key = ".".join(loc)
            problems.setdefault(key, f"{key} = {item['input']!r}: {_EXPECTED.get(item['type'], item['msg'])}")
    messages = [f"{'.'.join(where) + ': ' if where else ''}unknown key(s) {', '.join(sorted(keys))}; "
                f"known keys: {', '.join(_keys_at(cls, list(where)))}" for where, keys in unknown.items()]
    return "; ".join(messages + list(problems.values()))


def build(cls: Type[T], values: Mapping[str, Any], source: str) -> T:
    """Instantiate the :func:`schema` class ``cls`` from ``values``.

    Raises:
        ValueError: ``source: `` then what is wrong: unknown keys (listing the known ones), a value
            of the wrong type, or the class's own checks.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a mapping of keys to values, got {values!r}")
    try:
        return cls(**{str(key): value for key, value in values.items()})
    except pydantic.ValidationError as error:
        raise ValueError(f"{source}: {_describe(error, cls)}") from None


def dump_yaml(values: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a resolved config as YAML (keys in their order), atomically."""
    write_bytes_atomic(path, yaml.safe_dump(dict(values), sort_keys=False).encode())
