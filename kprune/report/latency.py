"""Latency of one image (batch 1): Keras and TFLite, at a chosen number of threads.

TensorFlow fixes its thread pools when it starts, so a Keras latency at a given thread count is
measured in a fresh Python process (``python -m kprune.report.latency``); the LiteRT interpreter
takes its thread count per instance and runs in this process. Every figure is taken after warm-up
runs (tracing, allocator and kernel caches), over at least ``runs`` timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np

WARMUP = 3
RUNS = 20


def latency_stats(seconds) -> Dict[str, float]:
    """``mean_ms``, ``median_ms``, ``p90_ms`` and ``min_ms`` of run times in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min())}


def time_calls(fn: Callable[[], object], runs: int = RUNS, warmup: int = WARMUP) -> Dict[str, float]:
    """Statistics of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    if runs < 1:
        raise ValueError(f"runs {runs}: need at least 1")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {**latency_stats(seconds), "runs": runs}


def _image(size: int) -> np.ndarray:
    return np.random.default_rng(0).random((1, size, size, 3), dtype=np.float32)


def tflite_latency(content: bytes, model, threads: int, runs: int = RUNS, warmup: int = WARMUP) -> Dict[str, float]:
    """Batch-1 latency of a TFLite flatbuffer in the LiteRT interpreter with ``threads`` threads
    (``model``: the Keras model it came from, for the shapes)."""
    from kprune.models.litert import TFLiteRunner

    runner = TFLiteRunner(content, model, threads=threads)
    image = _image(model.input_shape[1])
    return time_calls(lambda: runner.invoke(image), runs, warmup)


def keras_latency(model_path: str, threads: int, runs: int = RUNS, warmup: int = WARMUP) -> Dict[str, float]:
    """Batch-1 latency of a ``.keras`` model (graph ``tf.function``) in a fresh process whose
    TensorFlow uses ``threads`` threads.

    Raises:
        RuntimeError: the measuring process failed (its last error line included).
    """
    command = [sys.executable, "-m", "kprune.report.latency", os.fspath(model_path), "--threads", str(threads),
               "--runs", str(runs), "--warmup", str(warmup)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"latency of {model_path} at {threads} threads failed: {lines[-1] if lines else '?'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_here(model_path: str, threads: int, runs: int, warmup: int) -> Dict[str, float]:
    from kprune._keras import tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from kprune.models.io import load_model

    model = load_model(model_path)
    image = tf.constant(_image(model.input_shape[1]))
    forward = tf.function(lambda x: model(x, training=False))
    # .numpy() of the outputs makes sure the pass has finished before the clock stops
    return time_calls(lambda: [o.numpy() for o in tf.nest.flatten(forward(image))], runs, warmup)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description="Batch-1 Keras latency of a .keras model (prints JSON).")
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    args = parser.parse_args(argv)
    print(json.dumps(_measure_here(args.model, args.threads, args.runs, args.warmup)))


if __name__ == "__main__":
    main()
