"""Saving and loading models (``.keras``, safe_mode)."""

from __future__ import annotations

import os

from kprune._keras import keras
from kprune.fileio import atomic_path
from kprune.models.layers import CUSTOM_OBJECTS


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
