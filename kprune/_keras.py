"""The one place that imports Keras.

tensorflow-model-optimization only works with Keras 2, which TensorFlow >= 2.16 ships as the separate
``tf_keras`` package. ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow resolves ``tf.keras``,
otherwise TensorFlow (and tfmot, which uses ``tf.keras``) would pick Keras 3. Every other kprune module
does ``from kprune._keras import keras, tf``.

TensorFlow's start-up log is filtered here too. Loading its shared libraries runs C++ static
initialisers that log through Abseil before anyone has called ``absl::InitializeLog()``; Abseil then
writes every message to stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says ("oneDNN custom operations are
on", "Could not find cuda drivers", and Abseil's own "All log messages before absl::InitializeLog() is
called are written to STDERR"). ``libtensorflow_framework.so.2`` and ``_pywrap_profiler_plugin.so``
each carry their own copy of Abseil, so each prints the set once. No environment variable reaches that
code and Python cannot run anything inside a library before its initialisers, so the import runs with
file descriptor 2 sent to a temporary file; afterwards everything written there is passed on except
the C++ log lines below ``TF_CPP_MIN_LOG_LEVEL`` (2 unless the user set it) and Abseil's notice.
Python warnings, tracebacks and C++ errors written during the import therefore still appear, only
after the import has finished. The physical devices are listed inside the same block: on a machine
without an NVIDIA driver that is where CUDA's "failed call to cuInit" error appears, and it is dropped
there (only when no ``/dev/nvidiactl`` exists, so a broken driver on a GPU machine still shows).
``TF_CPP_MIN_LOG_LEVEL=0`` turns the filter off (everything is shown
as it is written, which is also what to use if the import itself crashes).
"""

import contextlib
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("TF_USE_LEGACY_KERAS", "1") not in ("1", "true", "True"):
    raise ImportError(
        "kprune needs Keras 2 (tf_keras) but TF_USE_LEGACY_KERAS is set to "
        f"{os.environ['TF_USE_LEGACY_KERAS']!r}; unset it or set it to 1"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"

# A C++ log line as Abseil (and TensorFlow's own logger) writes it: severity letter, MMDD (0000 before
# absl::InitializeLog()), time, thread id, file:line].
_LOG_LINE = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:\d[\d.]* +\d+ [^\s\]]+:\d+\] ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = b"failed call to cuInit"


def _min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` read as TensorFlow reads it: a leading integer, anything else is 0."""
    match = re.match(r"\s*([+-]?\d+)", os.environ.get("TF_CPP_MIN_LOG_LEVEL", ""))
    return int(match.group(1)) if match else 0


def _filter_log(text: bytes, min_level: int) -> bytes:
    """``text`` without Abseil's notice and without the C++ log lines of a severity below
    ``min_level`` (0 INFO, 1 WARNING, 2 ERROR; FATAL lines always stay). Every other line stays."""
    if min_level <= 0:
        return text
    no_gpu = not os.path.exists("/dev/nvidiactl")
    kept = []
    for line in text.splitlines(keepends=True):
        if line.rstrip(b"\r\n") == _ABSL_NOTICE or (no_gpu and _NO_DRIVER in line):
            continue
        match = _LOG_LINE.match(line)
        if match and _SEVERITY[match.group(1)] < min(min_level, 3):
            continue
        kept.append(line)
    return b"".join(kept)


def _flush_python_streams() -> None:
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stderr__) if s is not None}.values():
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def _startup_log_filtered(min_level: int):
    """Run the block with file descriptor 2 captured, then write back what :func:`_filter_log` keeps.

    Does nothing if ``min_level`` <= 0 or if descriptor 2 or a temporary file is not available.
    """
    if min_level <= 0:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    try:
        captured = tempfile.TemporaryFile()
    except OSError:
        os.close(saved)
        yield
        return
    with captured:
        _flush_python_streams()
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            _flush_python_streams()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = memoryview(_filter_log(captured.read(), min_level))
            while kept:
                kept = kept[os.write(2, kept):]


with _startup_log_filtered(0 if "tensorflow" in sys.modules else _min_log_level()):
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402
    tf.config.list_physical_devices("GPU")


def _check_keras_version() -> None:
    """Raise ImportError if Keras 3 slipped in where Keras 2 is required."""
    if not keras.__version__.startswith("2."):
        raise ImportError(f"tf_keras {keras.__version__} is not Keras 2")
    tf_keras_module = tf.keras.__name__
    if not tf_keras_module.startswith("tf_keras"):
        raise ImportError(
            f"tf.keras resolves to {tf_keras_module!r}, i.e. Keras 3: TensorFlow was imported and "
            "tf.keras used before TF_USE_LEGACY_KERAS=1 was set. Import kprune before using tf.keras."
        )


_check_keras_version()

__all__ = ["keras", "tf"]
