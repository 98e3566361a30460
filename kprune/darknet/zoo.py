"""Named Darknet models: the cfgs shipped with kprune (``kprune/models/cfg``), found by name (built by
:func:`kprune.darknet.builder.build_model`, or with any family's models by :func:`kprune.detectors.build`)."""

from __future__ import annotations

import os
from importlib import resources
from typing import List

_CFG_PACKAGE = "kprune.models"


def available() -> List[str]:
    """Names of the zoo models (the stems of the shipped cfg files)."""
    folder = resources.files(_CFG_PACKAGE) / "cfg"
    return sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".cfg"))


def cfg_path(name_or_path: str | os.PathLike) -> str:
    """The cfg file of a zoo model name, or ``name_or_path`` itself if it is an existing file.

    Raises:
        ValueError: neither a file nor a zoo name (the message lists the names).
    """
    text = os.fspath(name_or_path)
    if os.path.isfile(text):
        return text
    if text in available():
        return str(resources.files(_CFG_PACKAGE) / "cfg" / f"{text}.cfg")
    raise ValueError(f"{text!r} is neither a cfg file nor a zoo model; zoo models: {', '.join(available())}")
