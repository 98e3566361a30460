"""Quantization-aware training (QAT) of detectors for full-integer TFLite export.

:func:`quantize_aware_train` takes a trained detector, trains it ``epochs`` more with fake-quantized
weights and activations (tfmot's default 8-bit scheme: per-channel symmetric conv weights, per-tensor
asymmetric activations, as the TFLite converter quantizes), and returns the QAT model, which
:func:`kprune.export.tflite.convert` turns into an all-integer int8 file whose ranges are the
trained ones.

What tfmot does not know, and how it is handled here:

- Darknet batch norm. tfmot's Conv2D + BatchNormalization transform matches the layer's class name
  exactly (``BatchNormalization``), so :class:`~kprune.models.layers.DarknetBatchNormalization` (a
  subclass with its own formula) is neither matched nor in the registry. Even the matched pattern
  only drops the fake-quant between conv and batch norm and quantizes the *unfolded* kernel, which
  is the folded kernel's per-channel grid only because per-channel quantization is scale-invariant
  per output channel. Here every conv + batch norm pair is folded exactly first
  (:func:`fold_batch_norms`: kernel ``W * gamma / divisor``, bias ``beta - mean * gamma /
  divisor``), so QAT quantizes the very kernel TFLite will store, per channel or per tensor.
  Batch statistics no longer move during QAT; from a trained model that is what one wants.
- LeakyReLU (Darknet's ``leaky``): :class:`OutputQuantizeConfig`, its output quantized (TFLite's
  LEAKY_RELU has its own output scale). :class:`~kprune.models.layers.Mish` and
  :class:`~kprune.models.layers.L2Normalization` (SSD) likewise; Keras' ``mish`` activation is
  replaced by :class:`~kprune.models.layers.Mish` first, as the int8 conversion does.
- :class:`~kprune.models.layers.Reorg` and :class:`~kprune.models.layers.ChannelSlice`:
  :class:`PassThroughQuantizeConfig`, no quantizer of their own: they move values (TRANSPOSE,
  RESHAPE, SPACE_TO_DEPTH, STRIDED_SLICE), so their output keeps their input's scale.
- The head layers (:class:`~kprune.models.layers.DetectionHead`, an identity carrying the anchors,
  classes and names; :class:`~kprune.models.layers.MultiBoxHead`) stay unwrapped: the conv before a
  YOLO head already quantizes its output, and an unwrapped head keeps the QAT model a detector its
  family recognises, so the training loop (loss, target encoder) and the exporter's metadata work
  on it unchanged.

Activation ranges start at the float model's ranges on calibration images
(:func:`initialise_ranges`), not at tfmot's [-6, 6], which a run of an epoch or two (decay 0.999
per step) would hardly move.

Sparse models (unstructured pruning) train with tfmot's prune-preserving scheme
(``Default8BitPrunePreserveQuantizeScheme``): the quantized kernels keep exactly the zeros the model
came with.

The training itself is :func:`kprune.train.train_model` (the family's loss, target encoder, data
pipeline and schedule), with the QAT wrapping as its ``prepare`` step.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Dict, Optional

import numpy as np
import tensorflow_model_optimization as tfmot

from kprune._keras import keras, tf
from kprune.config import build
from kprune.detectors.base import inbound_layers, producer
from kprune.export.tflite import calibration_images, with_integer_mish
from kprune.models.bn_formulas import bn_formula
from kprune.models.layers import (HEAD_LAYERS, ChannelSlice, DarknetBatchNormalization, L2Normalization, Mish,
                                  Reorg)
from kprune.models.sparsity import KERNEL_LAYERS, kernel_values

quantize = tfmot.quantization.keras


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="kprune")(cls)


@_serializable
class OutputQuantizeConfig(quantize.QuantizeConfig):
    """Quantize a layer's output only (8 bits, per tensor, asymmetric: tfmot's activation quantizer);
    for layers without weights whose TFLite op has its own output scale (LEAKY_RELU, Mish's ops,
    L2_NORMALIZATION).

    Args:
        quantize_output: False when the output is quantized after (tfmot's Concatenate transform
            sets it to False for a concatenation's inputs, whose scale is the concatenation's).
    """

    def __init__(self, quantize_output: bool = True):
        self.quantize_output = bool(quantize_output)

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        if not self.quantize_output:
            return []
        return [quantize.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                           narrow_range=False)]

    def get_config(self):
        return {"quantize_output": self.quantize_output}


@_serializable
class PassThroughQuantizeConfig(OutputQuantizeConfig):
    """No quantizer at all: the layer moves values (reorg, channel slice), so its output has its
    input's scale."""

    def __init__(self, quantize_output: bool = False):
        super().__init__(False)

    def get_output_quantizers(self, layer):
        return []


#: the QuantizeConfig of each layer type tfmot's default registry does not know
QUANTIZE_CONFIGS = {
    keras.layers.LeakyReLU: OutputQuantizeConfig,
    Mish: OutputQuantizeConfig,
    L2Normalization: OutputQuantizeConfig,
    Reorg: PassThroughQuantizeConfig,
    ChannelSlice: PassThroughQuantizeConfig,
}


def quantize_objects() -> Dict[str, object]:
    """The custom objects a QAT model needs to be cloned, saved or loaded (pass to
    ``tfmot.quantization.keras.quantize_scope``)."""
    return {"OutputQuantizeConfig": OutputQuantizeConfig, "PassThroughQuantizeConfig": PassThroughQuantizeConfig}


# -- batch-norm folding ------------------------------------------------------------------------------


def _single_node(layer) -> None:
    if len(layer._inbound_nodes) != 1:
        raise ValueError(f"layer {layer.name} is used {len(layer._inbound_nodes)} times: folding and "
                         "equalisation need every layer called once")


def consumers(model) -> Dict[str, list]:
    """Layer name -> the layers that read its output (within ``model``)."""
    readers = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        for source in inbound_layers(layer):
            readers[source.name].append(layer)
    return readers


def replay(model, replace, name: Optional[str] = None):
    """A new functional model built by calling, in graph order, ``replace(layer)`` for every layer of
    ``model``: it returns the layer to call in its place, or None to drop the layer (its single
    input then stands for its output).

    Raises:
        ValueError: a layer that is called more than once, or a dropped layer with several inputs.
    """
    inputs = [keras.Input(t.shape[1:], dtype=t.dtype, name=producer(t).name) for t in model.inputs]
    made = {id(old): new for old, new in zip(model.inputs, inputs)}

    depths = sorted(model._nodes_by_depth, reverse=True)
    for depth in depths:
        for node in model._nodes_by_depth[depth]:
            layer = node.layer
            if isinstance(layer, keras.layers.InputLayer):
                continue
            _single_node(layer)
            args = tf.nest.map_structure(lambda v: made.get(id(v), v), node.call_args)
            kwargs = tf.nest.map_structure(lambda v: made.get(id(v), v), node.call_kwargs)
            substitute = replace(layer)
            if substitute is None:
                flat = tf.nest.flatten(args)
                if len(flat) != 1:
                    raise ValueError(f"layer {layer.name} has {len(flat)} inputs: only a one-input layer can be dropped")
                outputs = flat[0]
            else:
                outputs = substitute(*args, **kwargs)
            for old, fresh in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                made[id(old)] = fresh
    outputs = [made[id(t)] for t in model.outputs]
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=name or model.name)


def batch_norm_scale(layer):
    """(scale, offset) per channel of a batch norm at inference: ``y = x * scale + offset``.

    Raises:
        ValueError: a layer that is not a (Darknet or Keras) batch norm over the last axis.
    """
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise ValueError(f"layer {layer.name} ({type(layer).__name__}) is not a batch norm")
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    if axis not in (-1, len(layer.input_shape) - 1):
        raise ValueError(f"batch norm {layer.name} normalises axis {layer.axis}: only the channel axis (last) folds")
    mean = layer.moving_mean.numpy().astype(np.float64)
    variance = layer.moving_variance.numpy().astype(np.float64)
    gamma = layer.gamma.numpy().astype(np.float64) if layer.scale else np.ones_like(mean)
    beta = layer.beta.numpy().astype(np.float64) if layer.center else np.zeros_like(mean)
    if isinstance(layer, DarknetBatchNormalization):
        divisor = bn_formula(layer.formula).divisor(variance, np.sqrt, layer.epsilon)
    else:
        divisor = np.sqrt(variance + layer.epsilon)
    scale = gamma / divisor
    return scale, beta - mean * scale


def foldable_pairs(model) -> Dict[str, str]:
    """Conv name -> the batch norm that folds into it: a Conv2D with a linear activation whose only
    reader is a batch norm (over the channels)."""
    readers = consumers(model)
    pairs = {}
    for layer in model.layers:
        if type(layer) is keras.layers.Conv2D and layer.get_config()["activation"] == "linear":
            after = readers[layer.name]
            if len(after) == 1 and isinstance(after[0], keras.layers.BatchNormalization):
                pairs[layer.name] = after[0].name
    return pairs


def fold_batch_norms(model):
    """A copy of ``model`` in which every conv + batch norm pair (:func:`foldable_pairs`) is one conv
    with a bias, computing the same function at inference: kernel ``W * s``, bias ``(b - mean) * s +
    beta`` with ``s = gamma / divisor`` of the batch norm's own formula (Darknet's original or the
    fork's, or Keras'). Arithmetic in float64, stored in float32. Other layers keep their weights;
    the model itself is left unchanged. A model without batch norm comes back as a copy.

    Raises:
        ValueError: a layer called more than once.
    """
    pairs = foldable_pairs(model)
    folded_bn = set(pairs.values())
    weights = {}

    def replace(layer):
        if layer.name in folded_bn:
            return None
        config = layer.get_config()
        if layer.name in pairs:
            bn = model.get_layer(pairs[layer.name])
            scale, offset = batch_norm_scale(bn)
            kernel = layer.kernel.numpy().astype(np.float64)
            bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros(kernel.shape[-1])
            weights[layer.name] = [(kernel * scale).astype(np.float32), (bias * scale + offset).astype(np.float32)]
            config = {**config, "use_bias": True, "bias_initializer": "zeros"}
        else:
            weights[layer.name] = layer.get_weights()
        return layer.__class__.from_config(config)

    folded = replay(model, replace)
    for layer in folded.layers:
        if layer.name in weights and weights[layer.name]:
            layer.set_weights(weights[layer.name])
    return folded


# -- QAT --------------------------------------------------------------------------------------------


def is_sparse(model, threshold: float = 0.05) -> bool:
    """Whether any conv / dense kernel has more than ``threshold`` of exact zeros (an
    unstructured-pruned model, whose zeros QAT should keep)."""
    return any(np.mean(kernel_values(layer) == 0) > threshold
               for layer in model.layers if isinstance(layer, KERNEL_LAYERS))


#: endings of the names of the activation-range variables of tfmot's wrappers and input layer
RANGE_VARIABLES = ("post_activation", "output", "quantize_layer")


def initialise_ranges(qat_model, folded, images: np.ndarray, batch_size: int = 8) -> int:
    """Set the activation ranges of ``qat_model`` to the ranges the float model ``folded`` (the
    model it was made from, batch norms folded: :func:`fold_batch_norms`) reaches on ``images``,
    each widened to include 0 as TFLite requires; returns the number of ranges set.

    tfmot starts every moving-average range at [-6, 6] and moves it with a decay of 0.999 per step,
    so a QAT run of one or two epochs would train and export with ranges that are still mostly that
    guess (activations above 6 clipped, small ones coarse). Starting from the calibrated range, as
    the post-training converter does, QAT begins where post-training quantization ends.
    """
    wanted = {}  # float layer name (or None for the input) -> [(min variable, max variable)]
    for layer in qat_model.layers:
        variables = {w.name.split("/")[-1].split(":")[0]: w for w in layer.weights}
        for prefix in RANGE_VARIABLES:
            low, high = variables.get(prefix + "_min"), variables.get(prefix + "_max")
            if low is None or high is None:
                continue
            if isinstance(layer, quantize.QuantizeWrapperV2):
                source = layer.layer.name
            elif prefix == "quantize_layer":
                source = None
            else:
                continue
            wanted.setdefault(source, []).append((low, high))
    names = [n for n in wanted if n is not None]
    probe = keras.Model(folded.inputs, [folded.get_layer(n).output for n in names] + list(folded.inputs))
    low = {n: 0.0 for n in [*names, None]}
    high = dict(low)
    for start in range(0, len(images), batch_size):
        outputs = probe(images[start:start + batch_size], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for n, value in zip([*names, None], outputs):
            value = value.numpy()
            low[n], high[n] = min(low[n], float(value.min())), max(high[n], float(value.max()))
    count = 0
    for n, pairs in wanted.items():
        for low_var, high_var in pairs:
            low_var.assign(tf.cast(low[n], low_var.dtype))
            high_var.assign(tf.cast(high[n], high_var.dtype))
            count += 1
    return count


def quantize_model(model, sparse: Optional[bool] = None, calibration: Optional[np.ndarray] = None):
    """``model`` prepared for QAT: Keras mish replaced by the integer-friendly
    :class:`~kprune.models.layers.Mish`, batch norms folded (:func:`fold_batch_norms`), every layer
    but the heads annotated (tfmot's default configs, :data:`QUANTIZE_CONFIGS` for the layers it does
    not know) and ``quantize_apply``'d with the default 8-bit scheme, or the prune-preserving one for
    a sparse model (``sparse``: None decides by :func:`is_sparse`). With ``calibration`` images, the
    activation ranges start at the float model's ranges on them (:func:`initialise_ranges`), else at
    tfmot's [-6, 6].

    Raises:
        ValueError: a layer neither tfmot nor :data:`QUANTIZE_CONFIGS` knows, or a layer called more
            than once (named in the message).
    """
    sparse = is_sparse(model) if sparse is None else bool(sparse)
    try:
        folded = fold_batch_norms(with_integer_mish(model))
    except ValueError as error:  # a layer shared by several calls (Faster R-CNN's RPN head on every level)
        raise ValueError(f"quantization-aware training of {model.name}: {error}; post-training int8 "
                         f"(--quant int8) has no such limit") from None

    def annotate(layer):
        copy = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, HEAD_LAYERS):
            return copy
        config = QUANTIZE_CONFIGS.get(type(layer))
        return quantize.quantize_annotate_layer(copy, config() if config else None)

    annotated = keras.models.clone_model(folded, clone_function=annotate)
    annotated.set_weights(folded.get_weights())
    scheme = (tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme() if sparse
              else quantize.default_8bit.Default8BitQuantizeScheme())
    with quantize.quantize_scope(quantize_objects()):
        try:
            applied = quantize.quantize_apply(annotated, scheme)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"quantization-aware training of {model.name}: {error}") from None
        # quantize_apply calls the layers it leaves unwrapped (the heads) in two graphs, and a head
        # layer called twice has no single output to be found by: the heads get fresh copies. The
        # wrappers are kept as they are (a copy from their config would lose the prune-preserving
        # quantizers, which tfmot sets on the config object and does not serialise)
        copy = keras.models.clone_model(applied, clone_function=lambda layer: layer.__class__.from_config(
            layer.get_config()) if isinstance(layer, HEAD_LAYERS) else layer)
    if calibration is not None:
        initialise_ranges(copy, folded, calibration)
    return copy


#: training settings QAT fine-tuning takes from a model's training config (not its schedule from
#: scratch: learning rate, warm-up and epochs are QAT's own)
TRAINING_KEYS = ("batch_size", "optimizer", "augment", "letterbox", "loss", "seed", "steps_per_epoch")
#: QAT's own defaults: fine-tuning a trained model, no warm-up, no batch norm left to recalibrate
QAT_DEFAULTS = {"lr": 1e-4, "warmup_epochs": 0.0, "recalibrate_bn": 0, "precision": "float32"}


def qat_options(training: Optional[dict] = None, **overrides) -> dict:
    """The training options of a QAT run: :data:`QAT_DEFAULTS`, then the :data:`TRAINING_KEYS` of
    ``training`` (the model's training config values, e.g. a run's ``config.yaml``), then
    ``overrides`` that are not None."""
    options = dict(QAT_DEFAULTS)
    options.update({k: v for k, v in (training or {}).items() if k in TRAINING_KEYS})
    options.update({k: v for k, v in overrides.items() if v is not None})
    return options


def quantize_aware_train(model, data: str, epochs: int, options: Optional[dict] = None,
                         run_dir: Optional[str] = None, sparse: Optional[bool] = None, calibration: int = 64,
                         progress: bool = False):
    """Train ``model`` (left unchanged) for ``epochs`` with quantization-aware training on ``data``.

    Args:
        model: a detector of any family (YOLO, SSD), float32.
        data: a converted dataset folder (or name) with train and val splits.
        epochs: QAT epochs, at least 1.
        options: training options (:class:`kprune.train.TrainConfig` keys; see :func:`qat_options`);
            ``dataset``, ``epochs``, ``out`` and ``keep_sparsity`` are set here.
        run_dir: the training run's folder (log, checkpoints, metrics); None: a temporary folder,
            removed after.
        sparse: keep the kernels' zeros (tfmot's prune-preserving QAT); None: if the model is sparse
            (:func:`is_sparse`).
        calibration: training images whose float ranges start the activation ranges
            (:func:`initialise_ranges`); 0: tfmot's [-6, 6].
        progress: show Keras' progress bars.

    Returns:
        ``(qat_model, metrics)``: the QAT model (tfmot wrappers, fake-quantized; its outputs are what
        the int8 file computes, up to rounding) for :func:`kprune.export.tflite.convert` with
        ``int8``, and the run's metrics (``map50`` etc. of the QAT model in Keras).

    Raises:
        ValueError: epochs < 1, options the training config refuses, or a layer QAT cannot quantize.
    """
    from kprune.train import TrainConfig, resolve_dataset, train_model

    if int(epochs) < 1 or int(epochs) != epochs:
        raise ValueError(f"QAT epochs {epochs!r}: a whole number >= 1")
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kprune-qat-"))
        values = {**qat_options(), **(options or {}), "dataset": data, "epochs": int(epochs), "out": str(run_dir),
                  "keep_sparsity": False}
        config = build(TrainConfig, values, "QAT options")
        images = calibration_images(resolve_dataset(data), calibration, "train", model.input_shape[1],
                                    letterbox=config.letterbox) if calibration else None
        stack.enter_context(quantize.quantize_scope(quantize_objects()))
        trained, metrics = train_model(model, config, progress=progress,
                                       prepare=lambda detector, steps: quantize_model(detector, sparse, images))
    return trained, metrics
