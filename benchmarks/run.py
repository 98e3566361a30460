"""kprune benchmarks: ``python benchmarks/run.py --out bench-results.json`` (``make bench``).

Each section is one function registered in :data:`SECTIONS`; it returns a flat dict of numbers
(seconds, ms, GFLOP/s, ...) that goes into the JSON under ``sections.<name>``. ``--only`` selects
sections. The JSON and a readable ``.md`` summary (same stem) are written atomically and the summary
is printed. A section that raises is recorded as ``{"error": ...}`` and the script exits with 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

# kprune must come before TensorFlow: kprune._keras sets TF_USE_LEGACY_KERAS.
from kprune._keras import keras, tf
from kprune.darknet.builder import build_model
from kprune.darknet.weights import load_weights, save_weights
from kprune.fileio import write_bytes_atomic
from kprune.models.variants import cpuinfo, with_policy
from kprune.report.latency import interleaved
from kprune.models.counting import count_flops

REPO = Path(__file__).resolve().parent.parent
CFG_DIRS = (REPO.parent / "shared" / "darknet" / "cfg", REPO / "kprune" / "models" / "cfg")

MATMUL_N = 4096
# The model the demo trains (YOLOv2 with its reorg path, reduced width and input for 2 cores).
DEMO_MODEL = {"name": "yolov2", "input_size": 256, "width": 0.25}
DEMO_BATCH = 16
PIPELINE_GOAL_RATIO = 3.0
TRAIN_GOAL_FRACTION = 0.4
LATENCY_SIZE = 416
LOAD_GOAL_S = 3.0
LATENCY_GOAL_RATIO = 1.2
SURGERY_RATIO = 0.5  # global L1 on YOLOv2-416
SURGERY_GOAL_S = 10.0
PRUNED_UNIFORM_RATIO = 0.3  # uniform L1 on YOLOv2-416: 29.46 -> 15.25 GFLOPs, about half
SPEEDUP_GOAL = 0.9  # latency speed-up / FLOPs reduction
TFLITE_THREADS = 2
BUDGET_MODEL = {"input_size": 384, "width": 0.25}  # the synthetic baseline's architecture
BUDGET_TARGETS = (0.6, 0.4)  # latency targets, fractions of the dense model's measured time
BUDGET_LANDING = 0.05
INT8_GOAL = 1.5  # float / int8 TFLite median time on XNNPACK, same run
INT8_THREADS = (1, 2)


def find_cfg(name: str) -> Path:
    """Path of a Darknet cfg shipped with the project.

    Args:
        name: file name, e.g. ``yolov2.cfg``.

    Returns:
        The first existing ``<repo>/../shared/darknet/cfg/<name>`` or ``<repo>/kprune/models/cfg/<name>``.

    Raises:
        FileNotFoundError: neither exists.
    """
    for folder in CFG_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} not found in {', '.join(str(d) for d in CFG_DIRS)}")


def _timed(fn: Callable, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _repeat(fn: Callable, warmup: int, runs: int) -> np.ndarray:
    """Seconds of ``runs`` calls of ``fn()`` after ``warmup`` untimed calls (tracing, allocator warm-up)."""
    for _ in range(warmup):
        fn()
    return np.array([_timed(fn)[1] for _ in range(runs)])


# ---------------------------------------------------------------------------------------------------
# Sections


# The kernels of the peak: (name, FLOPs, a function of no arguments). Convolutions are the shapes
# of YOLOv2-416's heavy layers (3x3 on 26x26x512 -> 1024 in the head, 13x13x1024 -> 1024), where
# TensorFlow's convolution may beat its matmul; the peak is the best of all, so that a model's
# FLOPs / peak never exceeds 1.
PEAK_MATMULS = (1024, 2048, MATMUL_N)
PEAK_CONVS = ((26, 512, 1024), (13, 1024, 1024))


def _peak_kernels():
    kernels = []
    for n in PEAK_MATMULS:
        a = tf.random.uniform((n, n), dtype=tf.float32)
        b = tf.random.uniform((n, n), dtype=tf.float32)
        kernels.append((f"matmul_{n}", 2 * n**3, functools.partial(tf.function(tf.linalg.matmul), a, b)))
    for size, cin, cout in PEAK_CONVS:
        x = tf.random.uniform((1, size, size, cin), dtype=tf.float32)
        w = tf.random.uniform((3, 3, cin, cout), dtype=tf.float32)
        conv = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
        kernels.append((f"conv3x3_{size}x{size}x{cin}_to_{cout}", 2 * size * size * cin * cout * 9,
                        functools.partial(conv, x, w)))
    return kernels


@functools.lru_cache(maxsize=None)
def _matmul_peak(runs: int) -> Dict:
    """See :func:`matmul_peak`; cached so that the latency and throughput sections reuse this run's
    peak, not re-measure it."""
    kernels = {}
    # On CPU a tf.function call returns only when its ops have run, so wall time is compute time.
    for name, flop, fn in _peak_kernels():
        seconds = _repeat(fn, warmup=2, runs=runs)
        kernels[name] = {"best_s": float(seconds.min()), "median_s": float(np.median(seconds)),
                         "gflops_best": float(flop / seconds.min() / 1e9),
                         "gflops_median": float(flop / np.median(seconds) / 1e9)}
    square = kernels[f"matmul_{MATMUL_N}"]
    return {"n": MATMUL_N, "runs": runs, **square, **{f"{k}_gflops": v["gflops_best"] for k, v in kernels.items()},
            "peak_gflops": max(k["gflops_best"] for k in kernels.values()),
            "peak_kernel": max(kernels, key=lambda k: kernels[k]["gflops_best"])}


def matmul_peak(args: argparse.Namespace) -> Dict:
    """The machine's practical float32 FLOP/s peak in TensorFlow: the best of several kernels
    (square matmuls of 1024, 2048 and 4096, and YOLOv2's heaviest 3x3 convolutions), each the best of
    its runs.

    The best run is the kernel's figure: on a shared host outside load can halve the speed for
    seconds, so a ``gflops_median`` well below ``gflops_best`` flags a noisy run. The 4096x4096
    matmul's figures stay at the top level: they are the host's speed quoted beside every time.

    Args:
        args: the command line; uses ``matmul_runs``.

    Returns:
        ``n``, ``runs``, ``best_s``, ``median_s``, ``gflops_best`` and ``gflops_median`` (the 4096
        matmul, 2 n³ / seconds); ``<kernel>_gflops``, the best run of each kernel; ``peak_gflops``
        and ``peak_kernel``, the best of all.
    """
    return dict(_matmul_peak(args.matmul_runs))


def darknet_load(args: argparse.Namespace) -> Dict:
    """Time building YOLOv2 (608) from its cfg, loading a .weights file into it, and exporting one.

    The .weights file is written by ``save_weights`` from a freshly initialised model (random
    weights, moving variances 1), in a temporary folder removed afterwards. The load is timed on a
    second, fresh build, so parse+build and load are both measured as a user meets them after start-up.
    The file was just written, so it is read from the page cache (a cold disk read would add to it).

    Args:
        args: the command line (unused).

    Returns:
        Seconds of the first build (``build_first_s``, includes Keras' one-time set-up), of
        ``save_weights`` (``export_s``), of the fresh ``build_s`` and ``load_s`` and their
        ``total_s``; ``file_mb``; ``goal_total_s`` and ``meets_goal``.
    """
    cfg = find_cfg("yolov2.cfg")
    with tempfile.TemporaryDirectory(prefix="kprune-bench-") as folder:
        path = os.path.join(folder, "yolov2.weights")
        model, build_first_s = _timed(build_model, cfg)
        _, export_s = _timed(save_weights, model, path)
        del model
        keras.backend.clear_session()  # free the first model's ~200 MB of variables
        model, build_s = _timed(build_model, cfg)
        _, load_s = _timed(load_weights, model, path)
        file_mb = os.path.getsize(path) / 1e6
    total_s = build_s + load_s
    return {
        "cfg": cfg.name,
        "file_mb": file_mb,
        "build_first_s": build_first_s,
        "export_s": export_s,
        "build_s": build_s,
        "load_s": load_s,
        "total_s": total_s,
        "goal_total_s": LOAD_GOAL_S,
        "meets_goal": total_s <= LOAD_GOAL_S,
    }


def _interleaved_latency(passes: Dict[str, Callable], runs: int, result: Dict) -> Dict[str, Dict]:
    """Time ``runs`` rounds of every pass, alternating them so that outside load hits all alike;
    adds ``<variant>_{mean,median,p90,min}_ms`` to ``result`` and returns the statistics."""
    stats = interleaved(passes, runs, warmup=0)  # the sections warm their passes up themselves
    for variant, values in stats.items():
        result.update({f"{variant}_{key}": value for key, value in values.items() if key != "runs"})
    return stats


def yolov2_latency(args: argparse.Namespace) -> Dict:
    """Batch-1 forward latency of YOLOv2 at 416 against the ideal time FLOPs / peak (the best of the peak kernels).

    Two variants of ``model(x, training=False)`` in a ``tf.function``: plain (TensorFlow's graph
    executor, oneDNN kernels) and ``jit_compile=True`` (XLA). Their timed runs alternate, so that
    load from outside (on a shared host the speed can halve for seconds) hits both alike.

    ``ratio`` compares like with like: the best variant's fastest pass with the fastest run of the peak kernels
    (both estimate the uncontended machine); ``ratio_median`` uses the median pass instead.

    Args:
        args: the command line; uses ``runs`` and ``matmul_runs`` (the peak is reused if the
            ``matmul_peak`` section already ran).

    Returns:
        ``flops``, ``peak_gflops`` (best kernel of :func:`matmul_peak`), ``ideal_ms``, ``<variant>_{mean,median,p90,min}_ms``,
        ``<variant>_compile_s`` (first call: tracing and compilation), ``best_variant`` (faster
        pass), ``ratio``, ``ratio_median``, ``goal_ratio`` and ``meets_goal`` (on ``ratio``).
    """
    model = build_model(find_cfg("yolov2.cfg"), input_size=LATENCY_SIZE)
    flops = count_flops(model)
    peak = _matmul_peak(args.matmul_runs)["peak_gflops"]
    ideal_ms = flops / (peak * 1e9) * 1e3
    x = tf.random.uniform((1, LATENCY_SIZE, LATENCY_SIZE, 3))
    result = {"size": LATENCY_SIZE, "runs": args.runs, "flops": flops, "peak_gflops": peak}
    result["ideal_ms"] = ideal_ms
    passes = {}
    for variant, jit in (("graph", False), ("xla", True)):
        forward = tf.function(lambda images: model(images, training=False), jit_compile=jit)
        # .numpy() of the small head output makes sure the pass has finished before the clock stops.
        passes[variant] = lambda forward=forward: forward(x).numpy()
        _, result[f"{variant}_compile_s"] = _timed(passes[variant])
        for _ in range(3):  # warm-up: memory allocator, oneDNN primitive caches
            passes[variant]()
    stats = _interleaved_latency(passes, args.runs, result)
    best = min(stats, key=lambda variant: stats[variant]["min_ms"])
    result["best_variant"] = best
    result["ratio"] = stats[best]["min_ms"] / ideal_ms
    result["ratio_median"] = stats[best]["median_ms"] / ideal_ms
    result["goal_ratio"] = LATENCY_GOAL_RATIO
    result["meets_goal"] = bool(result["ratio"] <= LATENCY_GOAL_RATIO)
    return result


@functools.lru_cache(maxsize=None)
def _synthetic_dataset(num_train: int, num_val: int) -> Dict:
    """Generate the synthetic COCO-layout dataset and convert it, timing both (cached: the pipeline
    section reads the result). The folder lives until the process ends."""
    from data_tools import coco, synth
    from data_tools.convert import write_dataset

    folder = Path(tempfile.mkdtemp(prefix="kprune-bench-data-"))
    _, generate_s = _timed(synth.generate, folder / "raw", num_train=num_train, num_val=num_val, progress=False)
    records, names, nbytes = coco.coco_records(folder / "raw", 2017, None)
    manifest, convert_s = _timed(
        write_dataset, records, names, folder / "data", {"kind": "coco"}, {}, coco.DROPPED_FIELDS, nbytes,
        progress=False,
    )
    images = num_train + num_val
    return {"folder": folder / "data", "images": images, "generate_s": generate_s, "convert_s": convert_s,
            "bytes": manifest["bytes"]["tfrecords"]}


def data_conversion(args: argparse.Namespace) -> Dict:
    """Images per second of the synthetic generator and of the COCO converter on its output.

    The converter reads every image, strips JPEG metadata, decodes it with TensorFlow to check it,
    and writes TFRecords (threads: one per core).

    Returns:
        ``images``, ``generate_s``, ``generate_images_per_s``, ``convert_s``, ``convert_images_per_s``
        and ``tfrecord_mb``.
    """
    data = _synthetic_dataset(args.data_train, args.data_val)
    return {
        "images": data["images"],
        "generate_s": data["generate_s"],
        "generate_images_per_s": data["images"] / data["generate_s"],
        "convert_s": data["convert_s"],
        "convert_images_per_s": data["images"] / data["convert_s"],
        "tfrecord_mb": data["bytes"] / 1e6,
    }


def _train_step_seconds(model, images, targets, steps: int) -> np.ndarray:
    """Seconds of ``steps`` real training steps (YOLO loss, backward, Adam) after two warm-up steps."""
    from kprune.train import DetectorTrainer

    trainer = DetectorTrainer(model)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
    step = tf.function(trainer.train_step)
    return _repeat(lambda: float(step((images, targets))["loss"]), warmup=2, runs=steps)


def data_pipeline(args: argparse.Namespace) -> Dict:
    """Training input pipeline against the training step rate of the demo model.

    The pipeline runs as in training: shuffle, decode, letterbox, augmentation (flip, scale,
    translate, HSV), batching and the YOLOv2 targets, measured over ``--pipeline-batches`` batches
    after warm-up. The training step is one forward, YOLO loss, backward and Adam update of the demo
    model (:data:`DEMO_MODEL`) on a batch of the same size. Both are measured alone on the whole
    machine.

    Returns:
        ``model``, ``batch``, ``pipeline_images_per_s``, ``train_step_ms``, ``train_images_per_s``,
        ``ratio`` (pipeline / training), ``goal_ratio`` and ``meets_goal``.
    """
    from kprune.data.pipeline import make_dataset
    from kprune.detectors.yolo.targets import TargetEncoder
    from kprune.data.tfrecord import read_manifest
    from kprune import detectors

    data = _synthetic_dataset(args.data_train, args.data_val)
    manifest = read_manifest(data["folder"])
    spec = dict(DEMO_MODEL)
    model = detectors.build(spec.pop("name"), classes=len(manifest.classes), **spec)
    size = DEMO_MODEL["input_size"]
    dataset = make_dataset(manifest, "train", size, DEMO_BATCH, training=True,
                           encoder=TargetEncoder.from_model(model), seed=0, repeat=True)
    batches = iter(dataset)
    for _ in range(3):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        images, targets = next(batches)
    pipeline_ips = args.pipeline_batches * DEMO_BATCH / (time.perf_counter() - start)
    seconds = _train_step_seconds(model, images, targets, args.train_steps)
    train_ips = DEMO_BATCH / float(np.median(seconds))
    ratio = pipeline_ips / train_ips
    return {
        "model": f"{DEMO_MODEL['name']} width {DEMO_MODEL['width']} at {size}",
        "batch": DEMO_BATCH,
        "pipeline_images_per_s": pipeline_ips,
        "train_step_ms": float(np.median(seconds)) * 1e3,
        "train_images_per_s": train_ips,
        "ratio": ratio,
        "goal_ratio": PIPELINE_GOAL_RATIO,
        "meets_goal": bool(ratio >= PIPELINE_GOAL_RATIO),
    }


def training_throughput(args: argparse.Namespace) -> Dict:
    """Training images/s and the GFLOP/s they mean, against the peak of this run (:func:`matmul_peak`).

    A training step costs about 3x the forward FLOPs (forward, gradient of the activations,
    gradient of the weights). Measured on the demo model (batch 16), the same in mixed bfloat16,
    and on full YOLOv2 at 416 (batch 4, ``--train-steps`` steps), random images with targets from
    the real encoder.

    Returns:
        per model ``<m>_images_per_s``, ``<m>_gflops`` (achieved), ``<m>_fraction_of_peak``;
        ``demo_bf16_speedup``; ``peak_gflops``, ``goal_fraction`` (0.4) and ``meets_goal`` (the two
        float32 models).
    """
    from kprune.detectors.yolo.targets import TargetEncoder
    from kprune import detectors

    peak = _matmul_peak(args.matmul_runs)["peak_gflops"]
    result = {"peak_gflops": peak}
    spec = dict(DEMO_MODEL)
    demo = detectors.build(spec.pop("name"), classes=5, **spec)
    cases = {
        "demo": (demo, DEMO_BATCH),
        "demo_bf16": (with_policy(demo, "mixed_bfloat16"), DEMO_BATCH),  # precision: mixed_bfloat16
        "yolov2_416": (build_model(find_cfg("yolov2.cfg"), input_size=416), 4),
    }
    fractions = []
    for name, (model, batch) in cases.items():
        size = model.input_shape[1]
        rng = np.random.default_rng(0)
        images = tf.constant(rng.random((batch, size, size, 3), dtype=np.float32))
        boxes = np.tile(np.array([[[0.2, 0.2, 0.5, 0.6], [0.5, 0.1, 0.9, 0.4]]], np.float32), (batch, 1, 1))
        labels = np.zeros((batch, 2), np.int32)
        targets = TargetEncoder.from_model(model)(boxes, labels, (size, size))
        targets["ignore"] = tf.zeros((batch, 1, 4))
        seconds = _train_step_seconds(model, images, targets, args.train_steps)
        images_per_s = batch / float(np.median(seconds))
        gflops = 3 * count_flops(model) * images_per_s / 1e9
        result.update({f"{name}_batch": batch, f"{name}_images_per_s": images_per_s, f"{name}_gflops": gflops,
                       f"{name}_fraction_of_peak": gflops / peak})
        if name == "demo_bf16":  # against the float32 peak, so not part of the goal
            result["demo_bf16_speedup"] = images_per_s / result["demo_images_per_s"]
        else:
            fractions.append(gflops / peak)
        del model
        keras.backend.clear_session()
    result["goal_fraction"] = TRAIN_GOAL_FRACTION
    result["meets_goal"] = bool(min(fractions) >= TRAIN_GOAL_FRACTION)
    return result


def _randomized_yolov2(size: int, width: float = 1.0):
    """YOLOv2 (80 classes) at ``size`` and ``width`` with seeded random kernels, so that filter norms differ."""
    model = build_model(find_cfg("yolov2.cfg"), input_size=size, width=width)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) if w.ndim == 4 else w
                       for w in model.get_weights()])
    return model


def pruning_surgery(args: argparse.Namespace) -> Dict:
    """Time structured pruning of full YOLOv2-416 at 50 % global L1: the channel graph, the plan
    (one ranking over all layers, bisection to the ratio), and the surgery that builds the smaller
    model with the kept weights copied.

    Returns:
        ``graph_s``, ``plan_s``, ``remove_s``, ``total_s`` (one call of
        :func:`kprune.prune.structured.prune_filters`, which does all three), ``params_before`` /
        ``_after``, ``flops_before`` / ``_after``, ``goal_s`` (10) and ``meets_goal`` (on ``total_s``).
    """
    from kprune.prune.graph import ChannelGraph
    from kprune.prune.scope import layers_in_scope
    from kprune.prune.plan import plan_filters
    from kprune.prune.structured import prune_filters
    from kprune.prune.surgeon import remove_units
    from kprune.models.counting import count_params

    model = _randomized_yolov2(LATENCY_SIZE)
    graph, graph_s = _timed(ChannelGraph, model)
    plan, plan_s = _timed(plan_filters, model, graph, SURGERY_RATIO, "l1", "global", layers_in_scope(model, "all"))
    _, remove_s = _timed(remove_units, model, graph, plan.removed)
    pruned, total_s = _timed(prune_filters, model, SURGERY_RATIO, "l1", "global")
    result = {"size": LATENCY_SIZE, "ratio": SURGERY_RATIO, "graph_s": graph_s, "plan_s": plan_s,
              "remove_s": remove_s, "total_s": total_s,
              "params_before": count_params(model)["params"], "params_after": count_params(pruned.model)["params"],
              "flops_before": count_flops(model), "flops_after": count_flops(pruned.model),
              "goal_s": SURGERY_GOAL_S, "meets_goal": bool(total_s <= SURGERY_GOAL_S)}
    keras.backend.clear_session()
    return result


def pruned_speedup(args: argparse.Namespace) -> Dict:
    """Does removing half the FLOPs make YOLOv2-416 twice as fast? Dense against uniform-L1-pruned
    (``PRUNED_UNIFORM_RATIO`` of every layer's filters, kept counts rounded to 8), batch 1, in Keras
    (graph ``tf.function``) and in TFLite (float32, LiteRT interpreter, 2 threads). The four
    variants' timed runs alternate, so that outside load hits all alike.

    ``<engine>_ratio`` = speed-up / FLOPs reduction on the fastest passes (goal >= 0.9);
    ``<engine>_ratio_median`` on the medians.

    Returns:
        ``flops_dense``, ``flops_pruned``, ``flops_reduction``; per ``<engine>_<model>`` the latency
        statistics; per engine ``speedup``, ``ratio``, ``ratio_median``; ``goal`` and ``meets_goal``.
    """
    from kprune.export.tflite import convert
    from kprune.models.litert import TFLiteRunner
    from kprune.prune.structured import prune_filters

    dense = _randomized_yolov2(LATENCY_SIZE)
    models = {"dense": dense, "pruned": prune_filters(dense, PRUNED_UNIFORM_RATIO, "l1", "uniform").model}
    flops = {name: count_flops(m) for name, m in models.items()}
    result = {"size": LATENCY_SIZE, "runs": args.runs, "uniform_ratio": PRUNED_UNIFORM_RATIO,
              "flops_dense": flops["dense"], "flops_pruned": flops["pruned"],
              "flops_reduction": flops["dense"] / flops["pruned"], "tflite_threads": TFLITE_THREADS}
    x = np.random.default_rng(1).random((1, LATENCY_SIZE, LATENCY_SIZE, 3), dtype=np.float32)
    passes = {}
    for name, model in models.items():
        forward = tf.function(lambda images, model=model: model(images, training=False))
        passes[f"keras_{name}"] = lambda forward=forward: forward(x).numpy()
        content, result[f"tflite_{name}_convert_s"] = _timed(convert, model)
        result[f"tflite_{name}_mb"] = len(content) / 1e6
        runner = TFLiteRunner(content, model, threads=TFLITE_THREADS)
        passes[f"tflite_{name}"] = lambda runner=runner: runner.invoke(x)
    for run in passes.values():
        for _ in range(3):  # warm-up: tracing, allocator, kernel caches
            run()
    stats = _interleaved_latency(passes, args.runs, result)
    meets = []
    for engine in ("keras", "tflite"):
        speedup = stats[f"{engine}_dense"]["min_ms"] / stats[f"{engine}_pruned"]["min_ms"]
        result[f"{engine}_speedup"] = speedup
        result[f"{engine}_ratio"] = speedup / result["flops_reduction"]
        result[f"{engine}_ratio_median"] = (stats[f"{engine}_dense"]["median_ms"] / stats[f"{engine}_pruned"]["median_ms"]
                                            / result["flops_reduction"])
        meets.append(result[f"{engine}_ratio"] >= SPEEDUP_GOAL)
    result["goal"] = SPEEDUP_GOAL
    result["meets_goal"] = bool(all(meets))
    keras.backend.clear_session()
    return result


def latency_budget(args: argparse.Namespace) -> Dict:
    """Latency budgets (``kprune prune --target-latency``, NetAdapt-style tables) on the synthetic
    baseline's architecture (YOLOv2, width 0.25, 384 px, seeded random kernels), float TFLite at
    ``TFLITE_THREADS`` threads, global ``l1-normalized`` allocation, targets ``BUDGET_TARGETS`` of the
    dense time. The first search measures the latency tables into a fresh cache; the others reuse it.

    Returns:
        ``dense_ms``, ``table_entries``, ``table_s`` (the first search's table time); per target
        ``t<pct>_target_ms``, ``_predicted_ms``, ``_measured_ms``, ``_off`` (|measured - target| /
        target), ``_searches``, ``_flops_removed``, ``_s``; ``goal`` (``BUDGET_LANDING``) and
        ``meets_goal`` (every target landed within it).
    """
    from kprune.prune.command import prune
    from kprune.report.runtimes import get_runtime

    dense = _randomized_yolov2(BUDGET_MODEL["input_size"], BUDGET_MODEL["width"])
    runtime = get_runtime("tflite", TFLITE_THREADS, runs=max(args.runs, 10))
    result = {**BUDGET_MODEL, "runtime": runtime.key, "goal": BUDGET_LANDING}
    landed = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KPRUNE_CACHE"] = cache
        try:
            for fraction in BUDGET_TARGETS:
                key = f"t{round(100 * fraction)}"
                dense_ms = result.get("dense_ms")
                if dense_ms is None:  # the first search measures the dense model with the tables
                    from kprune.prune.latency import LatencyTable

                    table, result["table_s"] = _timed(LatencyTable.measure, dense, runtime, progress=False)
                    dense_ms = result["dense_ms"] = table.dense_ms
                    result["table_entries"] = table.measured
                target = fraction * dense_ms
                (pruned, report, _), seconds = _timed(prune, dense, "filters", target_latency=target,
                                                      allocation="global", criterion="l1-normalized",
                                                      runtime=runtime, progress=False)
                latency = report["latency"]
                result.update({f"{key}_target_ms": target, f"{key}_predicted_ms": latency["predicted_ms"],
                               f"{key}_measured_ms": latency["measured_ms"], f"{key}_off": latency["within"],
                               f"{key}_searches": len(latency["attempts"]), f"{key}_s": seconds,
                               f"{key}_flops_removed": 1 - report["flops_after"] / report["flops_before"]})
                landed.append(latency["within"] <= BUDGET_LANDING)
        finally:
            os.environ.pop("KPRUNE_CACHE", None)
    result["meets_goal"] = bool(all(landed))
    keras.backend.clear_session()
    return result


def int8_speedup(args: argparse.Namespace) -> Dict:
    """Is full-integer int8 TFLite faster than float? The synthetic baseline's architecture
    (``BUDGET_MODEL``, seeded random kernels) as float32 and as int8 (calibrated on 8 random images:
    the int8 kernels take as long whatever the ranges), on the LiteRT interpreter with its default
    XNNPACK delegate at ``INT8_THREADS`` threads, all timed interleaved
    (``benchmarks/int8_profile.py`` profiles a trained model op by op).

    Returns:
        per ``<variant>_<n>t`` the median ms, ``ratio_<n>t`` = float / int8, ``goal`` (``INT8_GOAL``)
        and ``meets_goal`` (every thread count), and ``int8_features`` (the CPU flags int8 kernels use).
    """
    from kprune.export.tflite import convert
    from kprune.models.variants import cpu_flags
    from kprune.report.profile import profile_files

    model = _randomized_yolov2(BUDGET_MODEL["input_size"], BUDGET_MODEL["width"])
    size = BUDGET_MODEL["input_size"]
    calibration = np.random.default_rng(2).random((8, size, size, 3), dtype=np.float32)
    files = {"float": convert(model), "int8": convert(model, "int8", calibration)}
    timed = profile_files(files, INT8_THREADS, max(args.runs, 10), runtimes=("xnnpack",))
    flags = cpu_flags()
    result = {**BUDGET_MODEL, "runs": max(args.runs, 10), "goal": INT8_GOAL,
              "int8_features": ",".join(f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
                                        if f in flags)}
    for variant, times in timed.items():
        result.update({f"{variant}_{n}t_ms": times[f"xnnpack_{n}t"] for n in INT8_THREADS})
    for n in INT8_THREADS:
        result[f"ratio_{n}t"] = result[f"float_{n}t_ms"] / result[f"int8_{n}t_ms"]
    result["meets_goal"] = bool(all(result[f"ratio_{n}t"] >= INT8_GOAL for n in INT8_THREADS))
    keras.backend.clear_session()
    return result


# Later sections (training, pruning) register here; the order is the run order.
SECTIONS: Dict[str, Callable[[argparse.Namespace], Dict]] = {
    "matmul_peak": matmul_peak,
    "darknet_load": darknet_load,
    "yolov2_latency": yolov2_latency,
    "data_conversion": data_conversion,
    "data_pipeline": data_pipeline,
    "training_throughput": training_throughput,
    "pruning_surgery": pruning_surgery,
    "pruned_speedup": pruned_speedup,
    "latency_budget": latency_budget,
    "int8_speedup": int8_speedup,
}


# ---------------------------------------------------------------------------------------------------
# Report


def machine_info() -> Dict:
    """CPU count, platform, CPU model and library versions, so results from different machines compare."""
    cpu_model = cpuinfo("model name")
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model or platform.processor() or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tf_keras": keras.__version__,
        "numpy": np.__version__,
        "git": commit,
    }


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**6:
        return f"{value:.4g}"
    return str(value)


def summary_markdown(results: Dict) -> str:
    """The results as Markdown: machine line, then one table of metric / value per section."""
    machine = results["machine"]
    lines = [
        "# kprune benchmarks",
        "",
        f"{results['timestamp']} — {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"{machine['platform']}, TensorFlow {machine['tensorflow']}, git {machine['git']}",
    ]
    for name, section in results["sections"].items():
        lines += ["", f"## {name}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in section.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (``--only`` names must be registered sections)."""
    parser = argparse.ArgumentParser(description="Run the kprune benchmarks; write JSON and Markdown results.")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON results file")
    parser.add_argument("--only", help=f"comma-separated sections, from: {', '.join(SECTIONS)}")
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes per latency variant")
    parser.add_argument("--matmul-runs", type=int, default=10, help="timed runs of the matmul peak")
    parser.add_argument("--data-train", type=int, default=800, help="synthetic training images to generate")
    parser.add_argument("--data-val", type=int, default=200, help="synthetic validation images to generate")
    parser.add_argument("--pipeline-batches", type=int, default=30, help="timed batches of the input pipeline")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps of the demo model")
    args = parser.parse_args(argv)
    names = list(SECTIONS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        parser.error(f"--only {args.only!r}: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.runs < 1 or args.matmul_runs < 1:
        parser.error("--runs and --matmul-runs must be at least 1")
    args.sections = names
    return args


def main(argv: List[str] | None = None) -> int:
    """Run the selected sections, write the JSON and Markdown results, print the summary.

    Returns:
        0 if every section ran, 1 if any raised (its error is in the results).
    """
    args = parse_args(argv)
    results = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "sections": {},
    }
    failed = False
    for name in args.sections:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            section, seconds = _timed(SECTIONS[name], args)
            section["section_s"] = seconds
        except Exception as exc:  # keep the other sections' numbers; the error is reported below
            traceback.print_exc()
            section, failed = {"error": f"{type(exc).__name__}: {exc}"}, True
        results["sections"][name] = section
    summary = summary_markdown(results)
    write_bytes_atomic(args.out, (json.dumps(results, indent=2) + "\n").encode("utf-8"))
    write_bytes_atomic(args.out.with_suffix(".md"), summary.encode("utf-8"))
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
