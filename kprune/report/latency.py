"""Latency of one image (batch 1): Keras and TFLite, at a chosen number of threads.

TensorFlow fixes its thread pools when it starts, so a Keras latency at a given thread count is
measured in a fresh Python process (``python -m kprune.report.latency``); the LiteRT interpreter
takes its thread count per instance and runs in this process. Every figure is taken after warm-up
runs (tracing, allocator and kernel caches), over at least ``runs`` timed runs. Models compared
with each other are timed *interleaved* (one run of each in turn), so that load from outside —
on a shared host the speed can halve for seconds — hits them all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from kprune._keras import tf
from kprune.models.io import load_model
from kprune.models.litert import TFLiteRunner

WARMUP = 3
RUNS = 20


def latency_stats(seconds) -> Dict[str, float]:
    """``mean_ms``, ``median_ms``, ``p90_ms`` and ``min_ms`` of run times in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min())}


def time_calls(fn: Callable[[], object], runs: int = RUNS, warmup: int = WARMUP) -> Dict[str, float]:
    """Statistics of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    return interleaved({"fn": fn}, runs, warmup)["fn"]


def interleaved(passes: Dict[str, Callable[[], object]], runs: int = RUNS,
                warmup: int = WARMUP) -> Dict[str, Dict[str, float]]:
    """Statistics of every pass over ``runs`` rounds that each time one call of every pass in
    turn, after ``warmup`` untimed calls of each."""
    if runs < 1:
        raise ValueError(f"runs {runs}: need at least 1")
    for run in passes.values():
        for _ in range(warmup):
            run()
    seconds = {name: [] for name in passes}
    for _ in range(runs):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: {**latency_stats(times), "runs": runs} for name, times in seconds.items()}


def _image(model) -> np.ndarray:
    """A batch-1 input of ``model``'s shape (an image, or any layer's input)."""
    return np.random.default_rng(0).random((1, *model.input_shape[1:]), dtype=np.float32)


def tflite_latency(content: bytes, model, threads: int, runs: int = RUNS, warmup: int = WARMUP) -> Dict[str, float]:
    """Batch-1 latency of a TFLite flatbuffer in the LiteRT interpreter with ``threads`` threads
    (``model``: the Keras model it came from, for the shapes)."""
    return tflite_latencies({"model": (content, model)}, threads, runs, warmup)["model"]


def tflite_latencies(flatbuffers: Dict[object, tuple], threads: int, runs: int = RUNS,
                     warmup: int = WARMUP) -> Dict[object, Dict[str, float]]:
    """Interleaved batch-1 latencies of several TFLite flatbuffers (name -> (content, Keras model);
    a name is any hashable key)."""
    passes = {}
    for name, (content, model) in flatbuffers.items():
        runner, image = TFLiteRunner(content, model, threads=threads), _image(model)
        passes[name] = lambda runner=runner, image=image: runner.invoke(image)
    return interleaved(passes, runs, warmup)


def keras_latency(model_path: str, threads: int, runs: int = RUNS, warmup: int = WARMUP) -> Dict[str, float]:
    """Batch-1 latency of a ``.keras`` model (graph ``tf.function``) in a fresh process whose
    TensorFlow uses ``threads`` threads.

    Raises:
        RuntimeError: the measuring process failed (its last error line included).
    """
    return keras_latencies([model_path], threads, runs, warmup)[os.fspath(model_path)]


def keras_latencies(model_paths, threads: int, runs: int = RUNS, warmup: int = WARMUP) -> Dict[str, Dict[str, float]]:
    """Interleaved batch-1 latencies of several ``.keras`` models (path -> statistics), all in one
    fresh process whose TensorFlow uses ``threads`` threads.

    Raises:
        RuntimeError: the measuring process failed (its last error line included).
    """
    paths = [os.fspath(p) for p in model_paths]
    command = [sys.executable, "-m", "kprune.report.latency", *paths, "--threads", str(threads),
               "--runs", str(runs), "--warmup", str(warmup)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"latency of {', '.join(paths)} at {threads} threads failed: {lines[-1] if lines else '?'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side(models: Dict[str, tuple], threads: Sequence[int], runs: int = RUNS,
                 int8: Optional[Dict[str, bytes]] = None) -> Dict[str, Dict[str, dict]]:
    """Keras and TFLite latency of several models timed side by side: at each thread count their
    runs alternate (Keras in one fresh process, TFLite here; the int8 files in the same interleaved
    runs as the float ones, so that their ratio is a ratio of one run).

    Args:
        models: ``.keras`` path -> (its TFLite flatbuffer, the loaded Keras model).
        threads: thread counts.
        int8: ``.keras`` path -> its full-integer TFLite flatbuffer, for the models that have one.

    Returns:
        path -> ``{"keras_<n>t": stats, ..., "tflite_<n>t": stats, ...}``, and
        ``"tflite_int8_<n>t"`` for the paths of ``int8``.

    Raises:
        ValueError: an ``int8`` path that is not one of ``models``.
    """
    int8 = dict(int8 or {})
    unknown = sorted(set(int8) - set(models))
    if unknown:
        raise ValueError(f"int8 files given for {', '.join(map(str, unknown))}: not among the models timed")
    paths = list(models)
    files = {(p, "float"): models[p] for p in paths}
    files.update({(p, "int8"): (content, models[p][1]) for p, content in int8.items()})
    keras = {n: keras_latencies(paths, n, runs) for n in threads}
    tflite = {n: tflite_latencies(files, n, runs) for n in threads}
    out = {}
    for p in paths:
        out[p] = {**{f"keras_{n}t": keras[n][os.fspath(p)] for n in threads},
                  **{f"tflite_{n}t": tflite[n][(p, "float")] for n in threads}}
        if p in int8:
            out[p].update({f"tflite_int8_{n}t": tflite[n][(p, "int8")] for n in threads})
    return out


def _measure_here(model_paths, threads: int, runs: int, warmup: int) -> Dict[str, Dict[str, float]]:
    # before TensorFlow runs its first op (importing it does not fix the thread pools yet)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    passes = {}
    for path in model_paths:
        model = load_model(path)
        image = tf.constant(_image(model))
        forward = tf.function(lambda x, model=model: model(x, training=False))
        # .numpy() of the outputs makes sure the pass has finished before the clock stops
        passes[path] = lambda forward=forward, image=image: [o.numpy() for o in tf.nest.flatten(forward(image))]
    return interleaved(passes, runs, warmup)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description="Batch-1 Keras latency of .keras models, interleaved "
                                                 "(prints JSON: path -> statistics).")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    args = parser.parse_args(argv)
    print(json.dumps(_measure_here(args.models, args.threads, args.runs, args.warmup)))


if __name__ == "__main__":
    main()
