"""Writing files atomically: a killed or failing write never leaves a half-written file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


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


def json_safe(payload):
    """``payload`` with NaN and infinite floats replaced by None, so that it is valid JSON."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: json_safe(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [json_safe(value) for value in payload]
    return payload


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (NaN written as null)."""
    write_bytes_atomic(path, (json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n").encode("utf-8"))


def write_csv_atomic(path: str | os.PathLike, rows) -> None:
    """Write a list of flat dicts (same keys, in the first row's order) as CSV, atomically."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))
