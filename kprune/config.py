"""Configs as YAML files that are small diffs from a base: ``base: other.yaml`` is read first (its
path relative to the file), then the file's own keys replace the base's, nested dicts merged key by
key. Unknown keys are refused, naming the file and the key, and listing the keys that exist.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Type, TypeVar

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


def build(cls: Type[T], values: Mapping[str, Any], source: str) -> T:
    """Instantiate the dataclass ``cls`` from ``values``, refusing keys it does not have.

    Raises:
        ValueError: an unknown key (the message lists the known ones).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(names)}")
    return cls(**values)


def dump_yaml(values: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a resolved config as YAML (keys in their order), atomically."""
    write_bytes_atomic(path, yaml.safe_dump(dict(values), sort_keys=False).encode())
