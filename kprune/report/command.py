"""``kprune report``: every figure of a model that a deployment decision needs, in one table.

For each model: parameters and non-zero parameters, FLOPs, the size of the ``.keras`` file and of
its float TFLite export (the ``.tflite`` of the same name if there is one, else converted in
memory), each also under gzip, bzip2 and xz; batch-1 latency in Keras and in TFLite at 1 and 2
threads (mean, median, p90 over ``runs`` runs after warm-up); and with a dataset, mAP@0.5 (VOC
all-point) and COCO mAP of the Keras model.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

THREADS = (1, 2)


def measure_model(path: str, data: Optional[str] = None, runs: int = 20, threads: Sequence[int] = THREADS,
                  progress: bool = False) -> dict:
    """All figures of one ``.keras`` model (see the module docstring); no latency for empty ``threads``.

    Raises:
        ValueError: not a ``.keras`` file, or a model / dataset that cannot be read.
    """
    from kprune.export.tflite import convert
    from kprune.models.io import load_model
    from kprune.report.latency import keras_latency, tflite_latency
    from kprune.report.metrics import compressed_sizes, count_flops, count_params, file_sizes

    if not str(path).endswith(".keras"):
        raise ValueError(f"{path}: kprune report takes .keras models (a .tflite of the same name is used too)")
    model = load_model(path)
    tflite_path = str(path)[: -len(".keras")] + ".tflite"
    if os.path.isfile(tflite_path):
        with open(tflite_path, "rb") as handle:
            content = handle.read()
        tflite_source = tflite_path
    else:
        content, tflite_source = convert(model), "float32, converted for this report"
    params = count_params(model)
    result = {"model": str(path), "params": params["params"], "nonzero_params": params["nonzero_params"],
              "flops": count_flops(model), "input_size": int(model.input_shape[1]),
              "keras_size": file_sizes(path), "tflite_size": compressed_sizes(content), "tflite": tflite_source,
              "latency": {}}
    for n in threads:
        result["latency"][f"keras_{n}t"] = keras_latency(path, n, runs)
    for n in threads:
        result["latency"][f"tflite_{n}t"] = tflite_latency(content, model, n, runs)
    if data is not None:
        from kprune.evaluate import evaluate_loaded

        scores = evaluate_loaded(model, data, progress=progress, source=str(path))
        result.update(map50=scores["map50"], coco_map=scores["coco_map"])
    return result


def report_models(paths: Sequence[str], data: Optional[str] = None, runs: int = 20,
                  threads: Sequence[int] = THREADS, progress: bool = False) -> List[dict]:
    """:func:`measure_model` for each path."""
    return [measure_model(p, data, runs, threads, progress) for p in paths]


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
