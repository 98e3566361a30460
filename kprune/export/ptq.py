"""Post-training quantization (PTQ) options for when QAT costs too much: weight transforms applied
to the float model before the full-integer conversion (:func:`kprune.export.tflite.convert`).

Options (:data:`PTQ_OPTIONS`; any combination, applied in this order):

- ``equalize``: cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization through Weight
  Equalization and Bias Correction"). For two convs in a chain ``conv1 -> f -> conv2`` where ``f``
  is positively homogeneous per channel (``f(s x) = s f(x)`` for ``s > 0``: LeakyReLU, ReLU, max
  pooling, zero padding, nothing), output channel ``i`` of conv1 is divided by ``s_i`` and input
  channel ``i`` of conv2 multiplied by it, which leaves the function unchanged;
  ``s_i = sqrt(r1_i / r2_i)`` with ``r1_i``, ``r2_i`` the largest ``|w|`` of that channel in each
  kernel makes both ranges ``sqrt(r1_i r2_i)``, so that no channel's weights are tiny beside the
  tensor's largest. Only chains where conv1's output reaches conv2 alone (no route, concatenation
  or shortcut fan-out) are equalised, over a few sweeps (a conv may be the second of one pair and
  the first of the next). Batch norms are folded into the convs first
  (:func:`kprune.export.qat.fold_batch_norms`). It mostly helps per-tensor weights; per-channel
  scales already absorb the channels' ranges.
- ``bias-correction``: the data-aware bias correction of the same paper: weight quantization
  shifts each output channel's mean by ``E[conv(x, W_q - W)]``; that expectation, over the
  calibration images' actual inputs of the conv (from the float model) is subtracted from the bias.
  ``W_q`` is quantized as the converter does: symmetric int8, [-127, 127], one scale per output
  channel (``max |w| / 127``) or, with ``per-tensor``, one for the kernel.
- ``per-tensor``: one weight scale per conv kernel instead of per output channel (TFLite's
  default): the comparison point, or what per-channel-less accelerators need.

:func:`prepare` applies them to a model; :func:`kprune.export.command.export` takes them as ``ptq``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from kprune._keras import keras, tf
from kprune.export.qat import consumers, fold_batch_norms

PTQ_OPTIONS = ("equalize", "bias-correction", "per-tensor")
#: layers that keep positive homogeneity channel by channel: f(s x) = s f(x) for s > 0, channel-wise
HOMOGENEOUS = (keras.layers.MaxPooling2D, keras.layers.ZeroPadding2D, keras.layers.ReLU)


def check_ptq(options: Iterable[str]) -> Tuple[str, ...]:
    """The options in application order, each once.

    Raises:
        ValueError: an unknown option (the message lists the known ones).
    """
    options = list(options or ())
    bad = [o for o in options if o not in PTQ_OPTIONS]
    if bad:
        raise ValueError(f"post-training quantization option(s) {', '.join(map(repr, bad))}: choose from "
                         f"{', '.join(PTQ_OPTIONS)}")
    return tuple(o for o in PTQ_OPTIONS if o in options)


# -- cross-layer equalisation ----------------------------------------------------------------------


def _homogeneous(layer) -> bool:
    if isinstance(layer, keras.layers.LeakyReLU):
        return float(layer.get_config()["alpha"]) >= 0
    if isinstance(layer, keras.layers.Activation):
        return layer.get_config()["activation"] in ("relu", "linear")
    return isinstance(layer, HOMOGENEOUS)


def _conv(layer) -> bool:
    return type(layer) is keras.layers.Conv2D and layer.get_config()["groups"] == 1


def equalizable_pairs(model) -> List[Tuple[str, str]]:
    """(conv1, conv2) name pairs whose channels can be rescaled: conv1 (a Conv2D with a linear or
    ReLU activation) reaches conv2 (a Conv2D) through positively homogeneous layers only, each
    tensor on the way read by exactly one layer and none of them a model output."""
    readers = consumers(model)
    outputs = {id(t) for t in model.outputs}
    pairs = []
    for layer in model.layers:
        if not _conv(layer) or layer.get_config()["activation"] not in ("linear", "relu"):
            continue
        current = layer
        while len(readers[current.name]) == 1 and id(current.output) not in outputs:
            following = readers[current.name][0]
            if _conv(following):
                pairs.append((layer.name, following.name))
                break
            if not _homogeneous(following):
                break
            current = following
    return pairs


def equalize(model, sweeps: int = 4):
    """A copy of ``model`` with batch norms folded and every :func:`equalizable_pairs` pair's
    channel ranges equalised (see the module docstring); the same function in float.

    Args:
        sweeps: passes over the pairs (each pass moves every pair to equal ranges given its
            neighbours; a few suffice).

    Returns:
        ``(model, report)``: report ``{"pairs": [[conv1, conv2], ...], "range_ratio_before": ...,
        "range_ratio_after": ...}``, the ratios being the median over the pairs' convs of the largest
        channel range over the smallest (1 is perfectly equalised).
    """
    folded = fold_batch_norms(model)
    pairs = equalizable_pairs(folded)
    kernels = {name: folded.get_layer(name).get_weights() for pair in pairs for name in pair}
    before = _range_ratio(kernels)
    for _ in range(int(sweeps)):
        for first, second in pairs:
            w1, w2 = kernels[first][0], kernels[second][0]
            r1 = np.max(np.abs(w1), axis=(0, 1, 2)).astype(np.float64)
            r2 = np.max(np.abs(w2), axis=(0, 1, 3)).astype(np.float64)
            scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            kernels[first] = [(w / (scale if w.ndim == 1 else scale[None, None, None, :])).astype(np.float32)
                              for w in kernels[first]]  # kernel and bias
            kernels[second] = [(w2 * scale[None, None, :, None]).astype(np.float32), *kernels[second][1:]]
    for name, weights in kernels.items():
        folded.get_layer(name).set_weights(weights)
    return folded, {"pairs": [list(p) for p in pairs], "range_ratio_before": before,
                    "range_ratio_after": _range_ratio(kernels)}


def _range_ratio(kernels: Dict[str, list]) -> Optional[float]:
    ratios = []
    for weights in kernels.values():
        ranges = np.max(np.abs(weights[0]), axis=(0, 1, 2))
        ranges = ranges[ranges > 0]
        if ranges.size:
            ratios.append(float(ranges.max() / ranges.min()))
    return float(np.median(ratios)) if ratios else None


# -- bias correction --------------------------------------------------------------------------------


def quantize_kernel(kernel: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """The kernel (..., out) as the converter stores it, dequantized: symmetric int8 in [-127, 127],
    scale ``max |w| / 127`` per output channel (or per kernel)."""
    kernel = np.asarray(kernel, np.float64)
    largest = np.max(np.abs(kernel), axis=tuple(range(kernel.ndim - 1))) if per_channel else np.max(np.abs(kernel))
    scale = np.where(largest > 0, largest / 127.0, 1.0)
    return np.clip(np.round(kernel / scale), -127, 127) * scale


def correct_biases(model, images: np.ndarray, per_channel: bool = True, batch_size: int = 8):
    """A copy of ``model`` (batch norms folded) whose conv biases absorb the mean shift their
    weight quantization causes: ``b -= mean over images and positions of conv(x, W_q - W)`` with
    ``x`` the conv's input in the float model on ``images``.

    Returns:
        ``(model, report)``: report ``{"convs": n, "mean_abs_correction": ...}``.

    Raises:
        ValueError: no images.
    """
    if images is None or len(images) == 0:
        raise ValueError("bias correction needs calibration images (--data)")
    folded = fold_batch_norms(model)
    # every conv that had a batch norm has a bias now; one without either keeps its weights
    convs = [layer for layer in folded.layers if _conv(layer) and layer.use_bias]
    inputs = [layer.input for layer in convs]
    probe = keras.Model(folded.inputs, inputs)
    errors = {layer.name: tf.constant((quantize_kernel(layer.kernel.numpy(), per_channel)
                                       - layer.kernel.numpy()).astype(np.float32)) for layer in convs}
    sums = {layer.name: np.zeros(layer.filters) for layer in convs}
    counts = {layer.name: 0 for layer in convs}
    for start in range(0, len(images), batch_size):
        values = probe(images[start:start + batch_size], training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for layer, x in zip(convs, values):
            shifted = _conv_like(layer, x, errors[layer.name])
            sums[layer.name] += tf.reduce_sum(shifted, axis=(0, 1, 2)).numpy()
            counts[layer.name] += int(np.prod(shifted.shape[:3]))
    corrections = []
    for layer in convs:
        shift = sums[layer.name] / counts[layer.name]
        bias = layer.bias.numpy().astype(np.float64)
        layer.bias.assign((bias - shift).astype(np.float32))
        corrections.append(np.abs(shift))
    mean = float(np.mean(np.concatenate(corrections))) if corrections else 0.0
    return folded, {"convs": len(convs), "mean_abs_correction": mean}


def _conv_like(layer, x, kernel):
    """``layer``'s convolution (strides, padding, dilation) of ``x`` with another kernel, no bias."""
    config = layer.get_config()
    return tf.nn.conv2d(x, kernel, strides=config["strides"], padding=config["padding"].upper(),
                        dilations=config["dilation_rate"])


# -- everything --------------------------------------------------------------------------------------


def prepare(model, options: Sequence[str], calibration: Optional[np.ndarray] = None):
    """``model`` transformed for post-training quantization by ``options`` (:func:`check_ptq`):
    equalisation, then bias correction (for the weight granularity ``per-tensor`` chooses); the
    model itself when neither is asked.

    Returns:
        ``(model, report)``: report ``{"options": [...], "per_channel": bool}`` plus
        ``equalize`` and ``bias_correction`` reports of what was done.

    Raises:
        ValueError: an unknown option, or bias correction without calibration images.
    """
    options = check_ptq(options)
    per_channel = "per-tensor" not in options
    report = {"options": list(options), "per_channel": per_channel}
    if "equalize" in options:
        model, report["equalize"] = equalize(model)
    if "bias-correction" in options:
        model, report["bias_correction"] = correct_biases(model, calibration, per_channel)
    return model, report


# -- the comparison ------------------------------------------------------------------------------------

#: the post-training variants :func:`quantization_rows` measures by default: label -> options
PTQ_VARIANTS = {
    "ptq per-channel": (),
    "ptq per-tensor": ("per-tensor",),
    "ptq per-channel + bias correction": ("bias-correction",),
    "ptq per-tensor + bias correction": ("per-tensor", "bias-correction"),
    "ptq per-channel + equalize": ("equalize",),
    "ptq per-tensor + equalize": ("per-tensor", "equalize"),
    "ptq per-tensor + equalize + bias correction": ("per-tensor", "equalize", "bias-correction"),
}


def _scored(model, content: bytes, data, label: str, kind: str, **extra) -> dict:
    from kprune.evaluate import evaluate_loaded
    from kprune.models.litert import TFLiteRunner

    scores = evaluate_loaded(model, data, predict=TFLiteRunner(content, model) if content else None)
    return {"label": label, "kind": kind, "map50": scores["map50"], "coco_map": scores["coco_map"],
            "bytes": len(content) if content else None, **extra}


def quantization_rows(model, data: str, variants: Optional[Dict[str, Sequence[str]]] = None, qat_epochs: Sequence[int] = (),
                      qat_options: Optional[dict] = None, run_dir: Optional[str] = None, calibration: int = 100,
                      controls: bool = True, log=None) -> List[dict]:
    """Float against int8 of one model: the rows of a quantization table, each ``label``, ``kind``
    (``float``, ``ptq``, ``qat``, ``float control``, ``ptq control``), ``map50``, ``coco_map``,
    ``bytes`` (of the .tflite; None for Keras) and ``seconds`` (of the preparation and conversion,
    or of the training), mAP on the dataset's ``val`` split, the int8 files run in LiteRT.

    Args:
        model: a float detector.
        data: the converted dataset: calibration images (``train``) and mAP (``val``).
        variants: label -> PTQ options (:data:`PTQ_VARIANTS` by default).
        qat_epochs: for each E, a QAT run of E epochs (:func:`kprune.export.qat.quantize_aware_train`
            with ``qat_options``), its int8 file scored; with ``controls``, the float model trained
            the same E epochs with the same options without QAT, scored in float and as PTQ int8,
            since extra training alone can move mAP.
        run_dir: folder for the training runs (``qat-E``, ``float-E``); required with ``qat_epochs``.
        log: called with a line per finished row.

    Raises:
        ValueError: unknown PTQ options, or ``qat_epochs`` without ``run_dir``.
    """
    import os
    import time

    from kprune.export.qat import QAT_DEFAULTS, quantize_aware_train
    from kprune.export.tflite import calibration_images, convert

    variants = PTQ_VARIANTS if variants is None else variants
    for options in variants.values():
        check_ptq(options)
    if qat_epochs and run_dir is None:
        raise ValueError("QAT rows need a run_dir for their training runs")
    images = calibration_images(data, calibration, "train", model.input_shape[1])
    rows = []

    def add(row):
        rows.append(row)
        if log:
            log(row)

    add(_scored(model, b"", data, "float", "float", seconds=0.0))
    for label, options in variants.items():
        start = time.perf_counter()
        prepared, report = prepare(model, options, images)
        content = convert(prepared, "int8", images, per_channel=report["per_channel"])
        add(_scored(model, content, data, label, "ptq", seconds=time.perf_counter() - start, options=list(options)))
    for epochs in qat_epochs:
        start = time.perf_counter()
        qat, _ = quantize_aware_train(model, data, epochs, qat_options, run_dir=os.path.join(run_dir, f"qat-{epochs}"),
                                      calibration=calibration)
        seconds = time.perf_counter() - start
        add(_scored(qat, convert(qat, "int8", images), data, f"qat int8, {epochs} ep", "qat", seconds=seconds,
                    epochs=epochs))
        if controls:
            from kprune.config import build
            from kprune.train import TrainConfig, train_model

            values = {**QAT_DEFAULTS, **(qat_options or {}), "dataset": data, "epochs": int(epochs),
                      "out": os.path.join(run_dir, f"float-{epochs}")}
            start = time.perf_counter()
            tuned, _ = train_model(model, build(TrainConfig, values, "control options"), progress=False)
            seconds = time.perf_counter() - start
            add(_scored(tuned, b"", data, f"float fine-tuned {epochs} ep", "float control", seconds=seconds,
                        epochs=epochs))
            add(_scored(tuned, convert(tuned, "int8", images), data, f"ptq per-channel of float fine-tuned {epochs} ep",
                        "ptq control", epochs=epochs))
    return rows
