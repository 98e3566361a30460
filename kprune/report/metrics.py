"""File measurements: sizes as stored and under gzip, bzip2 and xz. (Parameters and FLOPs are
counted on the model: :mod:`kprune.models.counting`.)"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from typing import Dict



def file_sizes(path: str | os.PathLike) -> Dict[str, int]:
    """Bytes of a file as stored and under gzip (level 9), bzip2 (level 9) and xz (preset 6):
    pruned zeros do not make a file smaller, but they make it compress better.

    Raises:
        ValueError: ``path`` is not a file.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file")
    with open(path, "rb") as handle:
        return compressed_sizes(handle.read())


def compressed_sizes(data: bytes) -> Dict[str, int]:
    """``bytes``, ``gzip``, ``bzip2`` and ``xz`` sizes of ``data`` (see :func:`file_sizes`)."""
    return {"bytes": len(data), "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
            "bzip2": len(bz2.compress(data, compresslevel=9)), "xz": len(lzma.compress(data, preset=6))}
