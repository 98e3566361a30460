"""Saving and loading models (``.keras``, safe_mode) and writing files atomically."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator

from kprune._keras import keras
from kprune.models.layers import CUSTOM_OBJECTS


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    A killed or failing write therefore never leaves a half-written file under the final name.
    ``suffix`` keeps an extension that a writer insists on (Keras wants ``.keras``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode of a new file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write ``payload`` as JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(payload, indent=1) + "\n").encode("utf-8"))


def save_model(model, path: str | os.PathLike) -> None:
    """Save ``model`` as a ``.keras`` file, atomically.

    Raises:
        ValueError: ``path`` does not end in ``.keras``.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"model path {path} must end in .keras")
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def load_model(path: str | os.PathLike, compile: bool = False):
    """Load a ``.keras`` model with kprune's custom layers, ``safe_mode=True``.

    Raises:
        ValueError: the file is missing or is not a Keras model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"model file {path} does not exist")
    try:
        return keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS, compile=compile, safe_mode=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load model {path}: {exc}") from exc
