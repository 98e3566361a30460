"""Where a TFLite model's time goes, layer by layer: float against int8, XNNPACK against the
builtin kernels, at several thread counts.

The LiteRT Python interpreter (ai-edge-litert 2.3) has no op profiler (no profiling option on
``Interpreter`` or ``CompiledModel``), so each layer that becomes an op is timed as a model of its
own: the layer alone, with its input shapes at batch 1 and its weights, converted to float and to
int8 with integer input and output (so that no QUANTIZE / DEQUANTIZE ops join it), every variant
timed in one interleaved run (:func:`kprune.report.latency.interleaved`). The default XNNPACK
delegate is switched off with the builtin-only op resolver; whether XNNPACK took a layer's op is
read from the interpreter (:func:`kprune.models.litert.delegated_ops`).

Batch norm folds into the conv before it and the detection head adds no op, so they are not
timed; every other layer is (conv, activations, pooling, concatenation, reorg, ...).
"""

from __future__ import annotations

import warnings
from typing import Dict, Sequence

import numpy as np

from kprune._keras import keras, tf
from kprune.models.counting import count_flops
from kprune.models.litert import delegated_ops
from kprune.report.latency import RUNS, interleaved

QUANTS = ("float", "int8")
RUNTIMES = ("xnnpack", "builtin")
#: layer types that add no TFLite op of their own (folded into the conv before them, or the identity)
NO_OP = ("DarknetBatchNormalization", "BatchNormalization", "DetectionHead", "InputLayer")


def interpreter(content: bytes, threads: int, runtime: str = "xnnpack"):
    """A LiteRT interpreter of ``content`` with ``threads`` threads, tensors allocated, its input set
    to seeded random values: with the default XNNPACK delegate (``xnnpack``) or the builtin kernels
    only (``builtin``).

    Raises:
        ValueError: an unknown runtime.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    resolver = OpResolverType.AUTO if runtime == "xnnpack" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=content, num_threads=threads, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in it.get_input_details():
        values = rng.normal(0.0, 1.0, detail["shape"])
        if np.issubdtype(detail["dtype"], np.integer):
            info = np.iinfo(detail["dtype"])
            values = np.clip(np.round(values * 30), info.min, info.max)
        it.set_tensor(detail["index"], values.astype(detail["dtype"]))
    return it


def layer_models(model) -> Dict[str, object]:
    """Every layer of ``model`` that becomes TFLite ops, as a model of its own (name -> model): its
    inputs at batch 1, a copy of the layer with the same weights.

    A conv followed by batch norm is timed as the conv with a bias, which is what the converter
    folds the pair into.
    """
    out = {}
    for layer in model.layers:
        if type(layer).__name__ in NO_OP:
            continue
        shapes = layer.input_shape if isinstance(layer.input_shape, list) else [layer.input_shape]
        inputs = [keras.Input(tuple(s[1:]), batch_size=1) for s in shapes]
        config = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D):
            config["use_bias"] = True
        copy = layer.__class__.from_config(config)
        result = copy(inputs if len(inputs) > 1 else inputs[0])
        if isinstance(layer, keras.layers.Conv2D):
            weights = layer.get_weights()
            copy.set_weights(weights if len(weights) == 2 else [weights[0], np.zeros(config["filters"], np.float32)])
        else:
            copy.set_weights(layer.get_weights())
        out[layer.name] = keras.Model(inputs, result, name=f"single_{layer.name}")
    return out


def convert_single(model, quant: str, calibration: int = 8) -> bytes:
    """``model`` (a one-layer model) as float32 TFLite, or as int8 with int8 input and output,
    calibrated on ``calibration`` seeded random batches shaped like activations after a leaky ReLU
    (the values do not change the time of the int8 kernels)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant == "int8":
        rng = np.random.default_rng(1)
        shapes = [tuple(t.shape) for t in model.inputs]

        def representative():
            for _ in range(calibration):
                # a leaky-ReLU-like spread of values: most positive, a tail of small negatives
                yield [np.maximum(rng.normal(0.5, 1.0, s), -0.1).astype(np.float32) for s in shapes]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # integer io: the converter warns that the input has no statistics; the calibration gives them
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


def profile_files(files: Dict[str, bytes], threads: Sequence[int] = (1, 2), runs: int = RUNS,
                  runtimes: Sequence[str] = RUNTIMES) -> Dict[str, Dict[str, float]]:
    """Median milliseconds of each flatbuffer (name -> content) on each runtime at each thread
    count, all timed in one interleaved run: name -> ``{"<runtime>_<n>t": ms}``."""
    passes = {(name, runtime, n): interpreter(content, n, runtime).invoke
              for name, content in files.items() for runtime in runtimes for n in threads}
    stats = interleaved(passes, runs)
    out = {name: {} for name in files}
    for (name, runtime, n), s in stats.items():
        out[name][f"{runtime}_{n}t"] = s["median_ms"]
    return out


def profile_layers(model, threads: Sequence[int] = (1, 2), runs: int = RUNS) -> Dict[str, object]:
    """Each op-making layer of ``model`` timed alone, float and int8, on XNNPACK and on the builtin
    kernels, at each thread count, all in one interleaved run.

    Returns:
        ``layers``: one dict per layer (``name``, ``type``, ``output_shape``, ``flops``, ``ops`` per
        quantization (the TFLite ops with whether XNNPACK took each), and ``ms``: ``"<quant>_<runtime>_<n>t"``
        -> median ms); ``by_type``: the same times summed over the layers of each type, with
        ``count``; ``threads``, ``runs``.
    """
    from kprune.models.litert import operators

    singles = layer_models(model)
    files, layers = {}, []
    for name, single in singles.items():
        layer = model.get_layer(name)
        entry = {"name": name, "type": type(layer).__name__, "output_shape": list(single.output_shape[1:]),
                 "flops": int(count_flops(single)), "ops": {}}
        for quant in QUANTS:
            content = files[(name, quant)] = convert_single(single, quant)
            entry["ops"][quant] = [{"op": o["op"], "xnnpack": taken}
                                   for o, taken in zip(operators(content), delegated_ops(content))]
        layers.append(entry)
    timed = profile_files(files, threads, runs)
    by_type: Dict[str, Dict[str, float]] = {}
    for entry in layers:
        entry["ms"] = {f"{quant}_{key}": timed[(entry["name"], quant)][key] for quant in QUANTS
                       for key in timed[(entry["name"], quant)]}
        group = by_type.setdefault(entry["type"], {"count": 0})
        group["count"] += 1
        for key, ms in entry["ms"].items():
            group[key] = group.get(key, 0.0) + ms
    return {"layers": layers, "by_type": by_type, "threads": list(threads), "runs": runs}


def type_table(profile: Dict[str, object], threads: Sequence[int] = (1, 2)) -> str:
    """:func:`profile_layers`' ``by_type`` as a Markdown table: per layer type, float and int8 ms
    on XNNPACK and on the builtin kernels, at each thread count, and whether XNNPACK took the ops."""
    taken = {}
    for entry in profile["layers"]:
        for quant in QUANTS:
            ops = entry["ops"][quant]
            ok = taken.setdefault((entry["type"], quant), True)
            taken[(entry["type"], quant)] = ok and all(o["xnnpack"] for o in ops)
    head = ["layer type (ops)", "n"]
    for n in threads:
        head += [f"float XNNPACK {n}t", f"int8 XNNPACK {n}t", f"float builtin {n}t", f"int8 builtin {n}t"]
    head += ["XNNPACK takes float / int8"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, group in profile["by_type"].items():
        ops = next(e["ops"]["int8"] for e in profile["layers"] if e["type"] == kind)
        cells = [f"{kind} ({', '.join(o['op'] for o in ops)})", str(group["count"])]
        for n in threads:
            cells += [f"{group[f'{q}_{r}_{n}t']:.2f}" for r, q in
                      (("xnnpack", "float"), ("xnnpack", "int8"), ("builtin", "float"), ("builtin", "int8"))]
        cells.append(" / ".join("yes" if taken[(kind, q)] else "no" for q in QUANTS))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
