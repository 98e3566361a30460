"""TFLite conversion, calibration on real images, and the check against Keras.

What the phone gets: the network up to its raw head outputs (the ``(grid, grid, anchors * (5 +
classes))`` tensors). Decoding (sigmoid / exp against the anchors) and NMS stay on the phone side,
as in Darknet's own apps: they are a few lines there, and keeping them out keeps every op of the
graph in TFLite's int8 kernel set. The anchors and class names are in the report and in the
``.keras`` file; ``kprune evaluate MODEL.tflite`` decodes exactly as the phone should.

Quantization (``quant``):
    ``none``: float32. ``fp16``: float16 weights (half the size, float compute).
    ``dynamic``: int8 weights, float activations. ``int8``: full-integer, weights and activations,
    calibrated on ``calibration`` images (the pipeline's evaluation-mode images of the dataset);
    ``io`` sets the input and output type (``float`` keeps float32 at the edges, with
    quantize/dequantize ops inside; ``int8`` / ``uint8`` need the app to apply the scale and zero
    point in the report).
Full-integer models keep every op int8 (checked for YOLOv2/v3, YOLOv4-tiny and YOLOv7-tiny in the
tests): the fork's pieces become these TFLite ops, float and int8 alike:

- ``[route] groups=`` (:class:`~kprune.models.layers.ChannelSlice`): STRIDED_SLICE.
- SPP ``[maxpool] size=5|9|13 stride=1`` and the tiny models' size-2 pools: MAX_POOL_2D (with a PAD
  before the stride-2 ones Keras pads explicitly).
- ``logistic``: LOGISTIC; ``swish``: LOGISTIC and MUL; ``leaky``: LEAKY_RELU.
- ``mish``: Keras' mish becomes EXP, ADD, LOG, TANH, MUL, which converts to int8 but is wrong there
  (see :class:`~kprune.models.layers.Mish`), so an ``int8`` conversion first replaces it by
  :class:`~kprune.models.layers.Mish` (RELU, MUL, SUB, EXP, ADD, LOG, ADD, TANH, MUL, all int8);
  the other modes keep Keras' five ops, exact in float.

``sparse``: pruned zeros are stored in TFLite's sparse tensor format where that makes the file
smaller (``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``).
"""

from __future__ import annotations

import warnings
from typing import Iterable, List, Optional, Sequence

import numpy as np

from kprune._keras import keras, tf
from kprune.data.pipeline import make_dataset
from kprune.data.tfrecord import Manifest, read_manifest
from kprune.detectors import family_of
from kprune.export.postprocess import (SCOPE, PostprocessOptions, outputs_in_op_order, postprocess_function,
                                       quantize_keeping_postprocess_float)
from kprune.export.selective import layer_scopes, quantize_keeping_float
from kprune.models.layers import Mish

QUANT_MODES = ("none", "fp16", "dynamic", "int8")
IO_TYPES = ("float", "int8", "uint8")


def calibration_images(data, count: int = 100, split: str = "train", size: Optional[int] = None,
                       letterbox: bool = True) -> np.ndarray:
    """The first ``count`` images of a split as the model sees them at inference (no augmentation),
    float32 in [0, 1], shape ``(n, size, size, 3)``.

    Raises:
        ValueError: ``count`` < 1, or the split has no images.
    """
    if count < 1:
        raise ValueError(f"calibration images {count}: need at least 1")
    manifest = data if isinstance(data, Manifest) else read_manifest(data)
    if split not in manifest.splits or manifest.num_images(split) == 0:
        raise ValueError(f"dataset {manifest.root}: split {split!r} has no images to calibrate on")
    dataset = make_dataset(manifest, split, size, batch_size=16, letterbox=letterbox, with_meta=True)
    batches, total = [], 0
    for images, _ in dataset:
        batches.append(images.numpy())
        total += len(batches[-1])
        if total >= count:
            break
    return np.concatenate(batches)[:count]


def family_float_layers(model) -> List[str]:
    """The layers the model's family keeps float in an int8 file (none for a model of no family)."""
    try:
        family = family_of(model)
    except ValueError:  # an arbitrary Keras model: everything int8
        return []
    return list(family.int8_float_layers(model))


def with_integer_mish(model):
    """``model`` with every Keras ``mish`` activation replaced by :class:`~kprune.models.layers.Mish`
    (same names and weights; the same function to float32 rounding), or ``model`` itself when it
    has none. Full-integer conversion needs it: see :class:`~kprune.models.layers.Mish`."""
    mish = {layer.name for layer in model.layers
            if isinstance(layer, keras.layers.Activation) and layer.get_config()["activation"] == "mish"}
    if not mish:
        return model

    def clone(layer):
        if layer.name in mish:
            return Mish(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def convert(model, quant: str = "none", calibration: Optional[np.ndarray] = None, io: str = "float",
            sparse: bool = False, postprocess: Optional[PostprocessOptions] = None, per_channel: bool = True,
            float_layers: Optional[Sequence[str]] = None) -> bytes:
    """Convert a Keras model to a TFLite flatbuffer; with ``postprocess``, one that ends in the
    detection post-processing op (:mod:`kprune.export.postprocess`). ``per_channel=False`` gives
    quantized conv weights one scale per tensor instead of one per output channel (the converter's
    default), the comparison point of :mod:`kprune.export.ptq`.

    ``float_layers`` (``int8`` only): names of layers whose ops stay float in the integer network
    (:mod:`kprune.export.selective`); None takes the model's family's choice
    (:meth:`~kprune.detectors.base.DetectorFamily.int8_float_layers`: a Faster R-CNN's proposals and
    RoIAlign; none for single-stage detectors and models of no family).

    Raises:
        ValueError: an unknown mode or io type, ``int8`` without calibration images, an integer
            ``io`` without ``int8``, an integer ``io`` with float layers, a name that is not a layer
            of the model, or a model the converter refuses (its message included).
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"quantization {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    if io not in IO_TYPES:
        raise ValueError(f"io type {io!r}: choose one of {', '.join(IO_TYPES)}")
    if io != "float" and quant != "int8":
        raise ValueError(f"io {io} needs full-integer quantization (--quant int8)")
    source = with_integer_mish(model) if quant == "int8" else model
    scopes = []
    if quant == "int8":
        float_layers = family_float_layers(model) if float_layers is None else list(float_layers)
        scopes = layer_scopes(source, float_layers)
        if scopes and io != "float":
            raise ValueError(f"io {io} with layers kept in float ({', '.join(float_layers)}): TensorFlow's selective "
                             "quantization keeps float io")
    if postprocess is None:
        converter = tf.lite.TFLiteConverter.from_keras_model(source)
    else:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([postprocess_function(source, postprocess)], source)
        converter.allow_custom_ops = True  # TFLite_Detection_PostProcess is a custom op
    optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
    if quant in ("fp16", "dynamic", "int8"):
        optimizations.insert(0, tf.lite.Optimize.DEFAULT)
    converter.optimizations = optimizations
    if not per_channel:
        converter._experimental_disable_per_channel = True  # the converter's only switch for it
    if quant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif quant == "int8":
        if calibration is None or len(calibration) == 0:
            raise ValueError("int8 quantization needs calibration images (--data)")

        def representative() -> Iterable[List[np.ndarray]]:
            for image in calibration:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if postprocess is not None:
            if io != "float":
                raise ValueError(f"io {io} with --postprocess: a post-processed file keeps float io (the op's outputs "
                                 f"are float); its input is quantized inside")
            # the decoding before the op stays float (see kprune.export.postprocess)
            converter.target_spec.supported_ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)
        elif scopes:
            converter.target_spec.supported_ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)  # the float islands' kernels
        elif io != "float":
            converter.inference_input_type = converter.inference_output_type = {"int8": tf.int8,
                                                                                 "uint8": tf.uint8}[io]
    try:
        with warnings.catch_warnings():
            # float io with int8 inside: the converter warns that the input has no statistics, which
            # is exactly the case (the quantize op at the input uses the calibrated range)
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            if postprocess is not None and quant == "int8":
                if scopes:
                    content = quantize_keeping_float(converter, representative, [*scopes, SCOPE], same_scale=True)
                else:
                    content = quantize_keeping_postprocess_float(converter, representative)
            elif scopes:
                content = quantize_keeping_float(converter, representative, scopes, same_scale=True)
            else:
                content = converter.convert()
    except Exception as error:  # the converter raises many types; keep its message, drop its traceback
        raise ValueError(f"TFLite conversion of {model.name} ({quant}) failed: {str(error).strip()[-400:]}") from None
    return content if postprocess is None else outputs_in_op_order(content)


def differences(expected: List[np.ndarray], got: List[np.ndarray]) -> dict:
    """How far ``got`` (an export's outputs) is from ``expected`` (the Keras model's), output by
    output: ``max_abs_diff``, ``mean_abs_diff``, and the outputs' own scale, ``max_abs_output`` and
    ``mean_abs_output``."""
    diffs = [np.abs(np.asarray(g, np.float64) - e) for g, e in zip(got, expected)]
    return {"max_abs_diff": float(max(d.max() for d in diffs)),
            "mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
            "max_abs_output": float(max(np.abs(e).max() for e in expected)),
            "mean_abs_output": float(np.mean([np.abs(e).mean() for e in expected]))}


def compare(runner, model, images: np.ndarray) -> dict:
    """The TFLite model (a :class:`kprune.models.litert.TFLiteRunner`) against Keras on ``images``:
    ``images`` and :func:`differences` of the raw outputs, the model's taken as its family makes
    them comparable with the file's (:meth:`~kprune.detectors.base.DetectorFamily.reference_outputs`:
    a Faster R-CNN's ROI outputs on the file's own proposals)."""
    got = runner(images)
    try:
        family = family_of(model)
    except ValueError:  # an arbitrary Keras model: its outputs as they are
        expected = [o.numpy() for o in tf.nest.flatten(model(images, training=False))]
    else:
        expected = family.reference_outputs(model, images, got)
    return {"images": int(len(images)), **differences(expected, got)}
