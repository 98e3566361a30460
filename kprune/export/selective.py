"""Selective int8 quantization: the network integer, named parts of the graph kept in float.

Some parts of a detector lose what matters to its detections when they run in int8: the decoding
before ``TFLite_Detection_PostProcess`` (:mod:`kprune.export.postprocess`), or a two-stage detector's
proposal generation and RoIAlign sampling (box coordinates on one int8 scale, top-k over tied int8
logits, level assignment by log2 of a quantized area). TensorFlow's selective quantization keeps
them float: ``tf.lite.experimental.QuantizationDebugger`` calibrates the float model, and its
``denylisted_nodes`` (the names of the tensors the kept ops write) stay float in the quantized file,
with QUANTIZE / DEQUANTIZE at their borders ("float islands").

Names in a converted file are the TensorFlow name scopes of the ops: ``MODEL/LAYER/op`` for a Keras
layer's ops, ``SCOPE/op`` for ops made under ``tf.name_scope(SCOPE)`` in a traced function. A fused
op's name joins the names of what it fused with ``;``; it belongs to the first.
"""

from __future__ import annotations

import warnings
from typing import List, Sequence

from kprune._keras import tf
from kprune.models.litert import flatbuffer_graph


def op_output_names(content: bytes) -> List[str]:
    """The names of the tensors the ops of a flatbuffer's main graph write, in op order."""
    _, _, graph = flatbuffer_graph(content)
    return [graph.Tensors(int(i)).Name().decode() for k in range(graph.OperatorsLength())
            for i in graph.Operators(k).OutputsAsNumpy()]


def layer_scopes(model, layers: Sequence[str]) -> List[str]:
    """The name scopes (``MODEL/LAYER``) of the ops of ``model``'s named layers in a converted file.

    Raises:
        ValueError: a name that is not a layer of ``model``.
    """
    names = {layer.name for layer in model.layers}
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"model {model.name!r} has no layer(s) {', '.join(map(repr, missing))} to keep in float")
    return [f"{model.name}/{name}" for name in layers]


def in_scopes(name: str, scopes: Sequence[str]) -> bool:
    """Whether the tensor ``name`` is written by an op of one of ``scopes`` (the first of a fused name)."""
    first = name.split(";")[0]
    return any(first.startswith(scope.rstrip("/") + "/") for scope in scopes)


#: ops the quantizer keeps on their neighbours' int8 scale whatever ``denylisted_nodes`` says (a slice,
#: gather, top-k or concatenation inside a float island stays int8 between a QUANTIZE and a DEQUANTIZE)
SAME_SCALE = ("CONCATENATION", "STRIDED_SLICE", "GATHER", "TOPK_V2")


def island_op_types(content: bytes, scopes: Sequence[str]) -> List[str]:
    """The :data:`SAME_SCALE` op types that run on float data inside ``scopes`` in a (calibrated,
    still float) flatbuffer: denylisting them by type keeps the islands float. Ops of these types
    elsewhere stay float too (a slice, gather or concatenation: data movement, no arithmetic)."""
    from kprune.models.litert import operators

    inside = set()
    for op, name in zip(operators(content), op_output_names_per_op(content)):
        if op["op"] in SAME_SCALE and op["inputs"] and op["inputs"][0] == "float32":
            if in_scopes(name, scopes):
                inside.add(op["op"])
    return sorted(inside)


def op_output_names_per_op(content: bytes) -> List[str]:
    """The name of each op's first output, one per op of the main graph, in op order."""
    _, _, graph = flatbuffer_graph(content)
    return [graph.Tensors(int(graph.Operators(k).OutputsAsNumpy()[0])).Name().decode()
            for k in range(graph.OperatorsLength())]


def quantize_keeping_float(converter, representative, scopes: Sequence[str], same_scale: bool = False) -> bytes:
    """Full-integer quantization with the ops of ``scopes`` kept in float.

    Args:
        converter: a ``TFLiteConverter`` set up for int8 with float io (representative dataset,
            ``TFLITE_BUILTINS_INT8`` and ``TFLITE_BUILTINS``: the kept ops need their float kernels).
        representative: the calibration generator.
        scopes: name scopes (``MODEL/LAYER``, :func:`layer_scopes`, or a traced function's scope).
        same_scale: also keep float, by type, the :data:`SAME_SCALE` ops found only inside the
            scopes (:func:`island_op_types`): an island that slices, gathers or ranks its data (a
            Faster R-CNN's proposals) is otherwise float only in its arithmetic.

    Returns:
        The flatbuffer: every op int8 that has an int8 kernel, except those of ``scopes``.

    Raises:
        ValueError: no op of the converted model lies in ``scopes`` (a wrong name would otherwise
            give a file with nothing kept float).
    """
    options = tf.lite.experimental.QuantizationDebugOptions()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")  # the debugger's own use
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative,
                                                             debug_options=options)
    # the calibrated model is still float: the names of its ops are those of the graph to keep
    kept = [name for name in op_output_names(debugger.calibrated_model) if in_scopes(name, scopes)]
    if not kept:
        raise ValueError(f"no op of the converted model lies in {', '.join(scopes)}: nothing to keep in float")
    options.denylisted_nodes = kept
    if same_scale:
        options.denylisted_ops = island_op_types(debugger.calibrated_model, scopes) or None
    return debugger.get_nondebug_quantized_model()
