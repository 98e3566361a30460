"""Why is (or is not) int8 TFLite faster than float here? A profile of a trained detector on this host.

``python benchmarks/int8_profile.py --model runs/synth-baseline/final.keras --data data/synth``
(``--out int8-profile.json``; a ``.md`` summary of the same stem is written beside it).

1. Whole models: the detector and a filter-pruned copy (uniform L1, ``--prune-ratio``), each as
   float, int8 (per-channel, float io, calibrated on the dataset), int8 with int8 io, and int8
   per-tensor, on the LiteRT interpreter with its default XNNPACK delegate and on the builtin
   kernels only, at 1 and 2 threads: all in one interleaved run, so the ratios are ratios of one run.
2. Which ops XNNPACK took in the float and int8 files (:mod:`kprune.export.compat`).
3. Per layer (:func:`kprune.report.profile.profile_layers`): every layer of the detector alone,
   float and int8, XNNPACK and builtin, 1 and 2 threads (there is no op profiler in the Python
   interpreter), summed by layer type.
4. Leaky ReLU against its alternatives (PReLU with a constant slope, max(x, 0.1 x), ReLU) at the
   first layer's activation shape, float and int8.

Beside every time: the host's CPU features that int8 kernels depend on (AVX-512 VNNI, AVX-VNNI,
AMX), the load average before and after, and the float32 4096x4096 matmul GFLOP/s
(``run._matmul_peak``): compare times only as ratios within this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from kprune._keras import keras
from kprune.export.compat import compatibility
from kprune.export.tflite import calibration_images, compare, convert
from kprune.fileio import write_bytes_atomic, write_json_atomic
from kprune.models.counting import count_flops
from kprune.models.io import load_model
from kprune.models.litert import TFLiteRunner
from kprune.models.variants import cpu_flags, cpuinfo
from kprune.prune.structured import prune_filters
from kprune.report.profile import convert_single, profile_files, profile_layers, type_table

import run  # benchmarks/run.py, beside this script: the matmul peak

INT8_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_tile",
                 "asimddp", "i8mm")
VARIANTS = ("float", "int8", "int8_io", "int8_per_tensor", "int8_leaky_max")


class LeakyMax(keras.layers.Layer):
    """max(x, alpha x): leaky ReLU as MUL and MAXIMUM ops instead of LEAKY_RELU (for comparison)."""

    def __init__(self, alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)

    def call(self, inputs):
        return keras.backend.maximum(inputs, self.alpha * inputs)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


def with_leaky_max(model):
    """``model`` with every LeakyReLU computed as :class:`LeakyMax` (same weights)."""
    def clone(layer):
        if isinstance(layer, keras.layers.LeakyReLU):
            return LeakyMax(float(layer.get_config()["alpha"]), name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def host(matmul_runs: int) -> Dict:
    """The CPU and its int8-relevant features, the load average and the matmul GFLOP/s."""
    flags = cpu_flags()
    import ai_edge_litert

    return {"cpu": cpuinfo("model name"), "cpu_count": os.cpu_count(),
            "int8_features": {f: f in flags for f in INT8_FEATURES},
            "ai_edge_litert": getattr(ai_edge_litert, "__version__", None),
            "load_before": os.getloadavg(), "matmul_gflops": run._matmul_peak(matmul_runs)["gflops_best"]}


def files_of(model, calibration: np.ndarray) -> Dict[str, bytes]:
    """The conversions of :data:`VARIANTS`."""
    return {"float": convert(model), "int8": convert(model, "int8", calibration),
            "int8_io": convert(model, "int8", calibration, io="int8"),
            "int8_per_tensor": convert(model, "int8", calibration, per_channel=False),
            "int8_leaky_max": convert(with_leaky_max(model), "int8", calibration)}


def leaky_variants(shape) -> Dict[str, object]:
    """Leaky ReLU (slope 0.1) and the graphs that could replace it, as one-layer models of ``shape``."""
    out = {}
    for name in ("leaky_relu", "prelu", "max_x_01x", "relu"):
        inputs = keras.Input(tuple(shape), batch_size=1)
        if name == "leaky_relu":
            y = keras.layers.LeakyReLU(0.1)(inputs)
        elif name == "prelu":
            y = keras.layers.PReLU(keras.initializers.Constant(0.1), shared_axes=[1, 2, 3])(inputs)
        elif name == "max_x_01x":
            y = keras.layers.Maximum()([inputs, keras.layers.Rescaling(0.1)(inputs)])
        else:
            y = keras.layers.ReLU()(inputs)
        out[name] = keras.Model(inputs, y)
    return out


def markdown(result: Dict) -> str:
    h = result["host"]
    lines = [f"# int8 against float TFLite on {h['cpu']} ({h['cpu_count']} CPUs)", "",
             f"matmul {h['matmul_gflops']:.0f} GFLOP/s; load average before {h['load_before'][0]:.2f}, after "
             f"{result['load_after'][0]:.2f}; int8 features: "
             + ", ".join(f for f, on in h["int8_features"].items() if on), "",
             "## Whole models (median ms, one interleaved run)", "",
             "| model | variant | " + " | ".join(result["columns"]) + " |", "|---|---|" + "---|" * len(result["columns"])]
    for name, variants in result["models"].items():
        for variant, times in variants["ms"].items():
            lines.append(f"| {name} | {variant} | " + " | ".join(f"{times[c]:.2f}" for c in result["columns"]) + " |")
    lines += ["", "float / int8 (same run): " + "; ".join(
        f"{name} {c}: {r:.2f}x" for name, m in result["models"].items() for c, r in m["float_over_int8"].items()), ""]
    for name, c in result["compatibility"].items():
        lines.append(f"- {name}: XNNPACK took {c['xnnpack']['taken']} of {c['xnnpack']['total']} ops"
                     + (f" (not {', '.join(c['xnnpack']['not_taken'])})" if c["xnnpack"]["not_taken"] else ""))
    lines += ["", "Dense model against Keras on 8 validation images (raw head outputs): " + "; ".join(
        f"{v}: max {c['max_abs_diff']:.3g}, mean {c['mean_abs_diff']:.3g}" for v, c in result["check_against_keras"].items())]
    lines += ["", "## By layer type (each layer alone, summed; median ms)", "", result["layers_table"], "",
              "## Leaky ReLU and its alternatives (median ms)", "",
              "| graph | " + " | ".join(result["columns_leaky"]) + " |", "|---|" + "---|" * len(result["columns_leaky"])]
    for name, times in result["leaky"].items():
        lines.append(f"| {name} | " + " | ".join(f"{times[c]:.3f}" for c in result["columns_leaky"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/synth-baseline/final.keras")
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--prune-ratio", type=float, default=0.4, help="uniform L1 filter ratio of the pruned copy")
    parser.add_argument("--calibration", type=int, default=32, help="calibration images of the int8 files")
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds of the whole models")
    parser.add_argument("--layer-runs", type=int, default=20, help="interleaved rounds of the single layers")
    parser.add_argument("--matmul-runs", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("int8-profile.json"))
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    start = time.perf_counter()

    result = {"host": host(args.matmul_runs), "model": args.model, "prune_ratio": args.prune_ratio,
              "threads": threads, "runs": args.runs}
    dense = load_model(args.model)
    models = {"dense": dense, "pruned": prune_filters(dense, args.prune_ratio, "l1", "uniform").model}
    calibration = calibration_images(args.data, args.calibration, "train", dense.input_shape[1])
    files = {(name, variant): content for name, model in models.items()
             for variant, content in files_of(model, calibration).items()}
    timed = profile_files(files, threads, args.runs)
    result["columns"] = columns = [f"{r}_{n}t" for r in ("xnnpack", "builtin") for n in threads]
    result["models"] = {}
    for name, model in models.items():
        ms = {variant: timed[(name, variant)] for variant in VARIANTS}
        result["models"][name] = {"gflops": count_flops(model) / 1e9, "ms": ms,
                                  "float_over_int8": {c: ms["float"][c] / ms["int8"][c] for c in columns}}
    result["compatibility"] = {f"{name} {variant}": {k: v for k, v in compatibility(files[(name, variant)]).items()
                                                     if k in ("xnnpack", "gpu", "warnings")}
                               for name in models for variant in ("float", "int8", "int8_leaky_max")}

    # what the variants cost in accuracy: raw head outputs against Keras on validation images
    check = calibration_images(args.data, 8, "val", dense.input_shape[1])
    result["check_against_keras"] = {variant: compare(TFLiteRunner(files[("dense", variant)], dense), dense, check)
                                     for variant in VARIANTS}

    profile = profile_layers(dense, threads, args.layer_runs)
    result["layers"] = profile
    result["layers_table"] = type_table(profile, threads)

    shape = dense.get_layer(next(l.name for l in dense.layers if isinstance(l, keras.layers.LeakyReLU))).output_shape[1:]
    leaky = {}
    for name, single in leaky_variants(shape).items():
        for quant in ("float", "int8"):
            leaky[(name, quant)] = convert_single(single, quant)  # int8 io, as the layers
    leaky_timed = profile_files(leaky, threads, args.layer_runs)
    result["columns_leaky"] = [f"{q}_{c}" for q in ("float", "int8") for c in columns]
    result["leaky_shape"] = list(shape)
    result["leaky"] = {name: {f"{q}_{c}": leaky_timed[(name, q)][c] for q in ("float", "int8") for c in columns}
                       for name in leaky_variants(shape)}

    result["load_after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - start
    write_json_atomic(args.out, result)
    text = markdown(result)
    write_bytes_atomic(args.out.with_suffix(".md"), text.encode("utf-8"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
