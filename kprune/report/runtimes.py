"""Where a latency is measured: the registry of runtimes (TFLite, Keras).

A runtime is an object with a name, a thread count and :meth:`Runtime.time`, which gives the batch-1
median milliseconds of several models timed interleaved (:mod:`kprune.report.latency`). The latency
budgets of :mod:`kprune.prune.latency` take one. This module loads without TensorFlow, so that
command-line choices can be derived from :data:`RUNTIMES`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict


class Runtime:
    """A place to time models at batch 1 with ``threads`` threads, ``runs`` runs each (medians)."""

    name = ""
    description = ""

    def __init__(self, threads: int = 1, runs: int = 20):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1 or runs < 1:
            raise ValueError(f"runtime {self.name}: threads {threads!r} and runs {runs!r} must be integers >= 1")
        self.threads, self.runs = threads, int(runs)

    @property
    def key(self) -> str:
        """The runtime and its threads, e.g. ``tflite-2t``."""
        return f"{self.name}-{self.threads}t"

    def time(self, models: Dict[str, object]) -> Dict[str, float]:
        """name -> Keras model in, name -> median milliseconds out."""
        raise NotImplementedError


class TFLiteRuntime(Runtime):
    name = "tflite"
    description = "the float TFLite file in the LiteRT interpreter"

    def time(self, models):
        from kprune.export.tflite import convert
        from kprune.report.latency import tflite_latencies

        files = {name: (convert(model), model) for name, model in models.items()}
        return {name: stats["median_ms"] for name, stats in tflite_latencies(files, self.threads, self.runs).items()}


class KerasRuntime(Runtime):
    name = "keras"
    description = "the Keras model as a tf.function, in a fresh process with that many threads"

    def time(self, models):
        from kprune.models.io import save_model
        from kprune.report.latency import keras_latencies

        with tempfile.TemporaryDirectory(prefix="kprune-latency-") as folder:
            paths = {}
            for k, (name, model) in enumerate(models.items()):
                paths[name] = str(Path(folder) / f"{k}.keras")
                save_model(model, paths[name])
            stats = keras_latencies(list(paths.values()), self.threads, self.runs)
        return {name: stats[path]["median_ms"] for name, path in paths.items()}


RUNTIMES = {runtime.name: runtime for runtime in (TFLiteRuntime, KerasRuntime)}


def get_runtime(name: str, threads: int = 1, runs: int = 20) -> Runtime:
    """A runtime of :data:`RUNTIMES` by name.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or bad threads or runs.
    """
    if name not in RUNTIMES:
        raise ValueError(f"runtime {name!r}: choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name](threads, runs)
