"""Which runtime takes which op of an exported TFLite file: the delegate compatibility report.

For each op of the main graph, in execution order: its name and kernel version, and

- ``xnnpack``: whether the LiteRT interpreter's default CPU delegate (XNNPACK) took it, read from
  the interpreter after it applied the delegate (:func:`kprune.models.litert.delegated_ops`), so
  the verdict is this runtime build's own, not a documented list's;
- ``gpu``: whether the op is in the GPU delegate's supported-op list (:data:`GPU_OPS`, the cases
  of ``tensorflow/lite/tools/versioning/gpu_compatibility.cc``, TF 2.21). The list is checked by
  op name only (the delegate also rejects some attribute values, e.g. unusual strides). It is not
  taken from ``tf.lite.experimental.Analyzer(gpu_compatibility=True)``: in the TensorFlow 2.21 and
  ai-edge-litert 2.3 wheels the analyzer calls every op compatible, even TOPK_V2 and Flex ops.

And the sparsity warning: zeroed weights make a file faster only through XNNPACK's sparse
inference, whose conditions (:func:`sparse_inference_conditions`) a Darknet-style detector does not
meet; a model with many zero weights that fails them gets a warning to remove filters instead.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from kprune.models.litert import delegated_ops, flatbuffer_graph, operators

#: ops the GPU delegate supports (builtin and custom), as its compatibility check lists them
GPU_OPS = frozenset("""
    ABS ADD ADD_N ATAN2 AVERAGE_POOL_2D BATCH_MATMUL CAST CEIL CONCATENATION CONV_2D COS CUMSUM DENSIFY
    DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE DIV DYNAMIC_UPDATE_SLICE ELU EMBEDDING_LOOKUP EQUAL EXP FLOOR
    FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GELU GREATER GREATER_EQUAL HARD_SWISH LEAKY_RELU LESS LESS_EQUAL LOG
    LOGICAL_AND LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT PACK PAD PADV2 POW
    PRELU QUANTIZE REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR
    RESIZE_NEAREST_NEIGHBOR RSQRT SELECT SELECT_V2 SIGN SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE
    SQUARED_DIFFERENCE STABLEHLO_CLAMP STRIDED_SLICE SUB SUM TANH TILE TRANSPOSE TRANSPOSE_CONV
    Convolution2DTransposeBias MaxPoolingWithArgmax2D MaxUnpooling2D Resampler
""".split())

#: the fraction of zero weights (convolution and dense kernels) from which a model counts as sparse
SPARSE_FRACTION = 0.3
#: XNNPACK runs a subgraph sparse only if its 1x1 convolutions have at least this fraction of zeros
XNNPACK_SPARSE_1X1 = 2 / 3

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _weights(content: bytes) -> List[dict]:
    """The constant filter of every conv / dense op of the main graph: ``op``, ``shape``, ``zeros``,
    ``size`` (a filter stored sparse, behind DENSIFY, counts its stored values as the non-zeros)."""
    schema, model, graph = flatbuffer_graph(content)
    dtypes = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
              schema.TensorType.INT8: np.int8, schema.TensorType.UINT8: np.uint8}
    producer = {}
    for k in range(graph.OperatorsLength()):
        for t in graph.Operators(k).OutputsAsNumpy():
            producer[int(t)] = k
    ops = operators(content)
    found = []
    for k, entry in enumerate(ops):
        if entry["op"] not in _WEIGHTED:
            continue
        index = int(graph.Operators(k).InputsAsNumpy()[1])
        # float16 weights and sparse storage put a DEQUANTIZE / DENSIFY between the buffer and the op
        sparse = False
        while index in producer and ops[producer[index]]["op"] in ("DEQUANTIZE", "DENSIFY"):
            sparse = sparse or ops[producer[index]]["op"] == "DENSIFY"
            index = int(graph.Operators(producer[index]).InputsAsNumpy()[0])
        tensor = graph.Tensors(index)
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
        size = int(np.prod(shape))
        if isinstance(data, int) or tensor.Type() not in dtypes:  # no data in the file (or an exotic type)
            continue
        values = data.view(dtypes[tensor.Type()])
        # sparse storage keeps (about) the non-zeros only: the rest of the filter is zeros as well
        zeros = size - int(np.count_nonzero(values))
        found.append({"op": entry["op"], "index": k, "shape": shape, "zeros": zeros, "size": size, "sparse": sparse})
    return found


def _keras_zero_fraction(model) -> float:
    zeros = total = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            kernel = getattr(layer, "depthwise_kernel", None)
        if kernel is not None:
            values = np.asarray(kernel.numpy())
            zeros += int(values.size - np.count_nonzero(values))
            total += int(values.size)
    return zeros / total if total else 0.0


def sparse_inference_conditions(content: bytes) -> Dict[str, bool]:
    """XNNPACK's conditions for running a graph sparse (its README, "Sparse Inference"), each
    checked on the file: ``sparse_storage`` (weights stored sparse, behind DENSIFY ops),
    ``starts_3x3_s2_rgb`` (the first conv is 3x3, stride 2, on 3 channels), ``ends_mean_or_d2s``
    (the graph ends in MEAN or DEPTH_TO_SPACE), ``zeros_1x1`` (at least 2/3 of the 1x1 convs'
    weights are zero; false without 1x1 convs).

    Raises:
        ValueError: ``content`` is not a TFLite flatbuffer.
    """
    schema, _, graph = flatbuffer_graph(content)
    ops = operators(content)
    weights = _weights(content)
    convs = [w for w in weights if w["op"] == "CONV_2D"]
    first = convs[0] if convs else None
    starts = False
    if first is not None:
        options = schema.Conv2DOptions()
        op = graph.Operators(first["index"])
        options.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        # TFLite filters are (out, h, w, in)
        starts = first["shape"][1:] == (3, 3, 3) and options.StrideH() == options.StrideW() == 2
    last = [o["op"] for o in ops if o["op"] not in ("DEQUANTIZE", "QUANTIZE", "RESHAPE")]
    pointwise = [w for w in convs if w["shape"][1:3] == (1, 1)]
    zeros_1x1 = (sum(w["zeros"] for w in pointwise) / sum(w["size"] for w in pointwise)) if pointwise else 0.0
    return {"sparse_storage": any(o["op"] == "DENSIFY" for o in ops),
            "starts_3x3_s2_rgb": starts,
            "ends_mean_or_d2s": bool(last) and last[-1] in ("MEAN", "DEPTH_TO_SPACE"),
            "zeros_1x1": bool(pointwise) and zeros_1x1 >= XNNPACK_SPARSE_1X1}


def compatibility(content: bytes, model=None, threads: int = 1) -> dict:
    """The delegate compatibility report of a TFLite flatbuffer (see the module docstring).

    Args:
        content: the flatbuffer.
        model: the Keras model it came from, for the fraction of zero weights (without it the
            fraction is read from the file's conv and dense filters).
        threads: interpreter threads when reading the delegation (does not change the verdict).

    Returns:
        ``ops`` (one dict per op: ``index``, ``op``, ``version``, ``inputs``, ``outputs`` (type
        names), ``xnnpack``, ``gpu``), ``xnnpack`` and ``gpu`` (``taken`` and ``total`` op counts and
        the sorted names of the ops ``not_taken``), ``zero_fraction`` (of the conv / dense weights),
        ``sparse_inference`` (:func:`sparse_inference_conditions`) and ``warnings`` (sentences).

    Raises:
        ValueError: ``content`` is not a loadable TFLite flatbuffer.
    """
    ops = operators(content, versions=True)
    taken = delegated_ops(content, threads)
    rows = [{"index": k, **op, "xnnpack": bool(x), "gpu": op["op"] in GPU_OPS}
            for k, (op, x) in enumerate(zip(ops, taken))]
    if model is not None:
        zero_fraction = _keras_zero_fraction(model)
    else:
        weights = _weights(content)
        total = sum(w["size"] for w in weights)
        zero_fraction = sum(w["zeros"] for w in weights) / total if total else 0.0
    conditions = sparse_inference_conditions(content)
    report = {"ops": rows, "zero_fraction": float(zero_fraction), "sparse_inference": conditions, "warnings": []}
    for runtime in ("xnnpack", "gpu"):
        missing = sorted({r["op"] for r in rows if not r[runtime]})
        report[runtime] = {"taken": sum(r[runtime] for r in rows), "total": len(rows), "not_taken": missing}
    if report["xnnpack"]["not_taken"]:
        report["warnings"].append(f"XNNPACK leaves {len(rows) - report['xnnpack']['taken']} of {len(rows)} ops to "
                                  f"the builtin kernels ({', '.join(report['xnnpack']['not_taken'])}): each switch "
                                  f"between delegate and kernels costs time")
    if report["gpu"]["not_taken"]:
        report["warnings"].append(f"the GPU delegate does not list {', '.join(report['gpu']['not_taken'])}: "
                                  f"those ops fall back to the CPU")
    if zero_fraction >= SPARSE_FRACTION and not all(conditions.values()):
        unmet = ", ".join(name for name, ok in conditions.items() if not ok)
        report["warnings"].append(
            f"{100 * zero_fraction:.0f} % of the weights are zero, but XNNPACK runs zeros as dense weights here "
            f"(its sparse inference needs weights stored sparse, a graph starting with a 3x3 stride-2 conv on 3 "
            f"channels, ending in MEAN or DEPTH_TO_SPACE, with >= 2/3 zeros in its 1x1 convs; unmet: {unmet}): "
            f"the file is smaller compressed but not faster; remove filters (kprune prune --method filters) for speed")
    return report


def text(report: dict) -> str:
    """:func:`compatibility`'s report in a few lines: counts, ops left out, warnings."""
    lines = []
    for runtime, name in (("xnnpack", "XNNPACK (CPU, this interpreter)"), ("gpu", "GPU delegate (op list)")):
        r = report[runtime]
        left = f"; not: {', '.join(r['not_taken'])}" if r["not_taken"] else ""
        lines.append(f"{name}: {r['taken']} of {r['total']} ops{left}")
    versions = sorted({(o["op"], o["version"]) for o in report["ops"]})
    lines.append("ops (version): " + ", ".join(f"{op} ({v})" for op, v in versions))
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return "\n".join(lines)
