"""``kprune report``: every figure of a model that a deployment decision needs, in one table.

For each model: parameters and non-zero parameters, FLOPs, the size of the ``.keras`` file and of
its float TFLite export (the ``.tflite`` of the same name if there is one, else converted in
memory), each also under gzip, bzip2 and xz; batch-1 latency in Keras, in float TFLite and in
full-integer int8 TFLite (the ``-int8.tflite`` of the same name if there is one, else converted in
memory: :func:`int8_flatbuffer`) at 1 and 2 threads (mean, median, p90 over ``runs`` runs after
warm-up; the float and int8 files of all models in one interleaved run); and with a dataset,
mAP@0.5 (VOC all-point) and COCO mAP of the Keras model.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from kprune.evaluate import evaluate_loaded
import numpy as np

from kprune.export.tflite import calibration_images, convert
from kprune.models.counting import count_flops, count_params
from kprune.models.io import load_model
from kprune.report.latency import side_by_side
from kprune.report.metrics import compressed_sizes, file_sizes

THREADS = (1, 2)
INT8_CALIBRATION = 100


def _check_path(path) -> str:
    if not str(path).endswith(".keras"):
        raise ValueError(f"{path}: kprune report takes .keras models (a .tflite of the same name is used too)")
    return str(path)


def figures(model, path: str, data: Optional[str] = None, progress: bool = False):
    """Everything but latency for ``model``, held in memory and saved as ``path`` (whose file gives
    the sizes).

    Returns:
        (figures, TFLite flatbuffer): the flatbuffer is the ``.tflite`` of the same name as ``path``
        if there is one, else ``model`` converted to float32 here.

    Raises:
        ValueError: ``path`` is not a ``.keras`` file or does not exist, or a dataset that does not fit.
    """
    path = _check_path(path)
    tflite_path = path[: -len(".keras")] + ".tflite"
    if os.path.isfile(tflite_path):
        with open(tflite_path, "rb") as handle:
            content = handle.read()
        tflite_source = tflite_path
    else:
        content, tflite_source = convert(model), "float32, converted for this report"
    params = count_params(model)
    result = {"model": path, "params": params["params"], "nonzero_params": params["nonzero_params"],
              "flops": count_flops(model), "input_size": int(model.input_shape[1]),
              "keras_size": file_sizes(path), "tflite_size": compressed_sizes(content), "tflite": tflite_source,
              "latency": {}}
    if data is not None:
        scores = evaluate_loaded(model, data, progress=progress, source=path)
        result.update(map50=scores["map50"], coco_map=scores["coco_map"])
    return result, content


def int8_flatbuffer(model, path: str, data: Optional[str] = None, calibration: int = INT8_CALIBRATION) -> tuple:
    """The full-integer (int8) TFLite file of ``model``, saved as ``path``, for timing it.

    Returns:
        (flatbuffer, source): the ``-int8.tflite`` of the same name as ``path`` if there is one (as
        ``kprune export --quant int8`` and experiments name it), else ``model`` converted here,
        calibrated on ``calibration`` images of ``data``'s train split, or without ``data`` on
        seeded random images (the file then times right, the int8 kernels taking as long whatever
        the ranges, but is no measure of int8 accuracy).

    Raises:
        ValueError: a dataset without train images, or a conversion that fails.
    """
    int8_path = str(path)[: -len(".keras")] + "-int8.tflite"
    if os.path.isfile(int8_path):
        with open(int8_path, "rb") as handle:
            return handle.read(), int8_path
    size = model.input_shape[1]
    if data is not None:
        images, source = calibration_images(data, calibration, "train", size), "dataset"
    else:
        images = np.random.default_rng(0).random((min(calibration, 8), size, size, 3), dtype=np.float32)
        source = "random"
    return convert(model, "int8", images), f"int8, calibrated on {len(images)} {source} images for this report"


def report_models(paths: Sequence[str], data: Optional[str] = None, runs: int = 20,
                  threads: Sequence[int] = THREADS, progress: bool = False,
                  models: Optional[Sequence] = None) -> List[dict]:
    """All figures of each ``.keras`` model (see the module docstring), the models timed side by side
    (:func:`kprune.report.latency.side_by_side`), float and int8 TFLite alike; no latency (and no
    int8 conversion) for empty ``threads``. A row with latency names its int8 file in ``tflite_int8``.

    Args:
        models: the models of ``paths`` (same order) already in memory, so that they are not
            loaded again; an entry None (or no list) loads that file.

    Raises:
        ValueError: not a ``.keras`` file, ``models`` not one per path, or a model / dataset that
            cannot be read.
    """
    paths = [_check_path(p) for p in paths]
    models = list(models) if models is not None else [None] * len(paths)
    if len(models) != len(paths):
        raise ValueError(f"{len(models)} models given for {len(paths)} paths: give one per path (None: load it)")
    loaded = [load_model(p) if m is None else m for p, m in zip(paths, models)]
    measured = [(*figures(model, path, data, progress), model) for path, model in zip(paths, loaded)]
    if threads:
        int8 = {}
        for r, _, model in measured:
            int8[r["model"]], r["tflite_int8"] = int8_flatbuffer(model, r["model"], data)
        latency = side_by_side({r["model"]: (content, model) for r, content, model in measured}, threads, runs,
                               int8=int8)
        for r, _, _ in measured:
            r["latency"] = latency[r["model"]]
    return [r for r, _, _ in measured]


def measure_model(path: str, data: Optional[str] = None, runs: int = 20, threads: Sequence[int] = THREADS,
                  progress: bool = False, model=None) -> dict:
    """:func:`report_models` of one model; ``model``: the model of ``path`` already in memory (not
    loaded again)."""
    return report_models([path], data, runs, threads, progress, models=[model])[0]


def table(rows: List[dict]) -> str:
    """The figures as a Markdown table (sizes in MB, latency medians in ms)."""
    latency_keys = list(rows[0]["latency"]) if rows else []
    head = ["model", "params", "non-zero", "GFLOPs", ".keras MB", "gzip", "bzip2", "xz", ".tflite MB", "xz"]
    head += [f"{k.replace('_', ' ')} ms" for k in latency_keys]
    with_map = any("map50" in r for r in rows)
    if with_map:
        head += ["mAP@0.5", "COCO mAP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k, t = r["keras_size"], r["tflite_size"]
        cells = [os.path.basename(r["model"]), f"{r['params']:,}", f"{r['nonzero_params']:,}", f"{r['flops'] / 1e9:.3f}",
                 *(f"{k[key] / 1e6:.2f}" for key in ("bytes", "gzip", "bzip2", "xz")),
                 f"{t['bytes'] / 1e6:.2f}", f"{t['xz'] / 1e6:.2f}"]
        cells += [f"{r['latency'][key]['median_ms']:.1f}" for key in latency_keys]
        if with_map:
            cells += [f"{r['map50']:.4f}", f"{r['coco_map']:.4f}"] if "map50" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
