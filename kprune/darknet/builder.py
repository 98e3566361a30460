"""Darknet cfg -> tf_keras functional model.

Layer names come from the cfg layer index, so any later tool finds layers by name: ``conv_12``,
``bn_12``, ``leaky_12`` (``mish_12``, ``swish_12``, ``logistic_12``, ``relu_12``: the activation of a
conv or shortcut), ``pad_12`` (explicit padding of a strided conv), ``maxpool_3``, ``route_25`` (only
when it concatenates several layers or takes a channel slice: a plain route of one layer is that
layer's output; a route of several layers with ``groups`` slices each into ``route_25_slice_0``,
``route_25_slice_1``, ... and concatenates them), ``reorg_26``, ``shortcut_4``, ``upsample_20``,
``region_31`` / ``yolo_16``.

Batch norm follows one formula per model (:mod:`kprune.models.bn_formulas`): by default the one of
the Darknet the cfg was written for (:func:`kprune.darknet.cfg.default_bn_formula`).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

from kprune._keras import keras
from kprune.darknet.cfg import HEAD_KINDS, CfgError, DarknetCfg, Section, default_bn_formula, read_cfg
from kprune.darknet.trunks import trunk_end
from kprune.models import bn_formulas
from kprune.models.layers import ChannelSlice, DarknetBatchNormalization, DetectionHead, Reorg
from kprune.models.width import round_filters

Size = Union[int, Tuple[int, int]]


def head_conv_indices(cfg: DarknetCfg) -> List[int]:
    """Indices of the convs that feed a region / yolo head (the layer right before each head).

    Raises:
        CfgError: a head that does not directly follow a convolutional layer.
    """
    indices = []
    for head in cfg.heads():
        before = cfg.layers[head.index - 1] if head.index > 0 else None
        if before is None or before.kind != "convolutional":
            raise head.error("a detection head must directly follow a [convolutional] layer")
        indices.append(before.index)
    return indices


def _parse_size(size: Size) -> Tuple[int, int]:
    values = [size, size] if isinstance(size, numbers.Integral) else list(size) if isinstance(size, (tuple, list)) else []
    if len(values) != 2 or not all(isinstance(v, numbers.Integral) and v > 0 and v % 32 == 0 for v in values):
        raise ValueError(f"input size {size} must be a positive multiple of 32 (or a (height, width) pair of them)")
    return int(values[0]), int(values[1])


def adapt_cfg(
    cfg: DarknetCfg,
    input_size: Optional[Size] = None,
    classes: Optional[int] = None,
    width: float = 1.0,
) -> DarknetCfg:
    """Return a copy of ``cfg`` with a new input size, class count and/or width multiplier.

    Args:
        cfg: the parsed cfg (left unchanged).
        input_size: new input side (or (height, width)), a multiple of 32.
        classes: new class count; the head convs' filters are recomputed.
        width: multiplier of every conv's filters except the head convs, rounded to a multiple of 8
            and at least 8.

    Raises:
        ValueError: a size that is not a positive multiple of 32, classes < 1, or width <= 0.
    """
    cfg = copy.deepcopy(cfg)
    if input_size is not None:
        cfg.net.params["height"], cfg.net.params["width"] = _parse_size(input_size)
    if classes is not None and (not isinstance(classes, numbers.Integral) or classes < 1):
        raise ValueError(f"classes must be a whole number of at least 1, got {classes}")
    if not (isinstance(width, numbers.Real) and math.isfinite(width) and width > 0):
        raise ValueError(f"width multiplier must be a positive finite number, got {width}")
    head_convs = set(head_conv_indices(cfg))
    if classes is not None:
        for head in cfg.heads():
            head.params["classes"] = int(classes)
    for head in cfg.heads():
        anchors = len(head["mask"]) if head.kind == "yolo" else head["num"]
        conv = cfg.layers[head.index - 1]
        needed = anchors * (5 + head["classes"])
        if classes is None and conv["filters"] != needed:
            raise conv.error(
                f"filters={conv['filters']} does not fit the next [{head.kind}]: {anchors} anchors x "
                f"(5 + {head['classes']} classes) = {needed}", "filters"
            )
        conv.params["filters"] = needed
    if width != 1.0:
        for section in cfg.layers:
            if section.kind == "convolutional" and section.index not in head_convs:
                section.params["filters"] = round_filters(section["filters"], width)
    return cfg


def _conv_padding(section: Section, size: int) -> Tuple[str, Optional[Tuple[int, int]]]:
    """Keras padding for a Darknet conv over an input side of ``size`` pixels.

    Darknet pads ``size // 2`` pixels (with pad=1) on the top/left and reads as far as the strides
    take it. For stride 1 and an odd kernel that is Keras' "same". Otherwise the padding is explicit:
    (top, bottom) with the bottom reduced to what the last window actually reads.
    """
    k, stride = section["size"], section["stride"]
    pad = k // 2 if section["pad"] else section["padding"]
    if stride == 1 and k % 2 == 1 and pad == k // 2:
        return "same", None
    if pad == 0:
        return "valid", None
    out = (size + 2 * pad - k) // stride + 1
    bottom = max(0, (out - 1) * stride + k - size - pad)
    return "valid", (pad, bottom)


def _pool_padding(section: Section, sizes) -> str:
    """Keras padding equal to Darknet's maxpool, which pads ``padding`` pixels in all, ``padding // 2``
    of them on the top/left, with out-of-image values ignored.

    Raises:
        CfgError: no Keras padding gives Darknet's windows for this size, stride, padding and input.
    """
    k, stride, pad = section["size"], section["stride"], section["padding"]
    for size in sizes:
        darknet_out = (size + pad - k) // stride + 1
        same_out = -(-size // stride)
        same_left = max((same_out - 1) * stride + k - size, 0) // 2
        valid_out = (size - k) // stride + 1
        if not ((darknet_out, pad // 2) == (same_out, same_left) or (pad == 0 and darknet_out == valid_out)):
            raise section.error(
                f"maxpool size={k} stride={stride} padding={pad} on a {size}-pixel input has no Keras equivalent"
            )
    return "valid" if pad == 0 else "same"


# cfg activation (kprune.darknet.cfg.ACTIVATIONS) -> the Keras layer applying it, serializable without
# custom code; "linear" adds none
_ACTIVATIONS = {
    "leaky": lambda i: keras.layers.LeakyReLU(alpha=0.1, name=f"leaky_{i}"),
    "relu": lambda i: keras.layers.ReLU(name=f"relu_{i}"),
    "logistic": lambda i: keras.layers.Activation("sigmoid", name=f"logistic_{i}"),
    "mish": lambda i: keras.layers.Activation("mish", name=f"mish_{i}"),  # x * tanh(softplus(x))
    "swish": lambda i: keras.layers.Activation("swish", name=f"swish_{i}"),  # x * sigmoid(x)
}


def _activate(section: Section, x):
    activation = section["activation"]
    return x if activation == "linear" else _ACTIVATIONS[activation](section.index)(x)


def _conv_block(section: Section, x, formula: str):
    i = section.index
    padding, pad_h = _conv_padding(section, x.shape[1])
    _, pad_w = _conv_padding(section, x.shape[2])
    if pad_h is not None:
        x = keras.layers.ZeroPadding2D((pad_h, pad_w), name=f"pad_{i}")(x)
    batch_norm = bool(section["batch_normalize"])
    x = keras.layers.Conv2D(
        section["filters"],
        section["size"],
        strides=section["stride"],
        padding=padding,
        use_bias=not batch_norm,
        name=f"conv_{i}",
    )(x)
    if batch_norm:
        x = DarknetBatchNormalization(formula=formula, name=f"bn_{i}")(x)
    return _activate(section, x)


def _route(section: Section, outputs: List):
    """Concatenation of the listed layers' outputs, of each only slice group_id of groups when
    groups > 1 (AlexeyAB's fork slices every listed layer separately, then concatenates)."""
    i, groups, group_id = section.index, section["groups"], section["group_id"]
    sources = [outputs[j] for j in section["layers"]]
    if groups > 1:
        for j, source in zip(section["layers"], sources):
            if source.shape[-1] % groups:
                raise section.error(f"layer {j} has {source.shape[-1]} channels, which do not split into "
                                    f"groups={groups} equal slices", "groups")
        if len(sources) == 1:
            return ChannelSlice(groups, group_id, name=f"route_{i}")(sources[0])
        sources = [ChannelSlice(groups, group_id, name=f"route_{i}_slice_{k}")(source)
                   for k, source in enumerate(sources)]
    if len(sources) == 1:
        return sources[0]
    return keras.layers.Concatenate(name=f"route_{i}")(sources)


def _layer(section: Section, outputs: List, x, reorg_mode: str, names, header, backbone, formula: str,
           net: Section):
    """The Keras output of one cfg layer, given the outputs of all earlier layers."""
    kind, i = section.kind, section.index
    if kind == "convolutional":
        return _conv_block(section, x, formula)
    if kind == "maxpool":
        return keras.layers.MaxPooling2D(
            section["size"], section["stride"], padding=_pool_padding(section, x.shape[1:3]), name=f"maxpool_{i}"
        )(x)
    if kind == "route":
        return _route(section, outputs)
    if kind == "reorg":
        return Reorg(section["stride"], mode=reorg_mode, name=f"reorg_{i}")(x)
    if kind == "shortcut":
        other = outputs[section["from"]]
        if tuple(other.shape[1:]) != tuple(x.shape[1:]):
            raise section.error(
                f"shortcut adds layer {section['from']} of shape {tuple(other.shape[1:])} to "
                f"layer {i - 1} of shape {tuple(x.shape[1:])}; shapes must match"
            )
        return _activate(section, keras.layers.Add(name=f"shortcut_{i}")([x, other]))
    if kind == "upsample":
        return keras.layers.UpSampling2D(section["stride"], interpolation="nearest", name=f"upsample_{i}")(x)
    if kind in HEAD_KINDS:
        anchors = section["anchors"]
        pairs = [anchors[j: j + 2] for j in range(0, len(anchors), 2)]
        loss = ("iou_loss", "iou_normalizer", "cls_normalizer", "obj_normalizer")
        extra = {"mask": section["mask"], "scale_x_y": section["scale_x_y"], "new_coords": section["new_coords"],
                 "loss_settings": {key: section[key] for key in loss}} if kind == "yolo" else {}
        # the cfg text the model does not otherwise carry (training settings), for kprune.darknet.writer
        options = {"net": dict(net.raw), "section": dict(section.raw)}
        return DetectionHead(
            kind, pairs, section["classes"], names=names, darknet_header=header, backbone=backbone,
            name=f"{kind}_{i}", darknet_options=options, **extra,
        )(x)
    raise section.error(f"no builder for [{kind}]")  # the parser only lets known kinds through


def build_model(
    cfg: Union[DarknetCfg, str, os.PathLike],
    input_size: Optional[Size] = None,
    classes: Optional[int] = None,
    width: float = 1.0,
    reorg_mode: str = "darknet",
    names: Optional[Sequence[str]] = None,
    darknet_header: Optional[Sequence[int]] = None,
    name: Optional[str] = None,
    backbone_end: Optional[int] = None,
    bn_formula: Optional[str] = None,
):
    """Build the tf_keras functional model a Darknet cfg describes (weights freshly initialised).

    Args:
        cfg: a parsed cfg or the path of a cfg file.
        input_size, classes, width: overrides, see :func:`adapt_cfg`.
        reorg_mode: ``darknet`` or ``space_to_depth``, see :class:`Reorg`.
        names: class names stored in the heads.
        darknet_header: .weights header stored in the heads (see :class:`DetectionHead`).
        name: model name; defaults to the cfg file's stem.
        backbone_end: index of the cfg's last backbone layer, stored in the heads; default: the end
            of the Darknet trunk the cfg starts with (:mod:`kprune.darknet.trunks`), if any.
        bn_formula: ``original`` or ``alexeyab`` (:data:`kprune.models.bn_formulas.BN_FORMULAS`),
            the batch norm of every layer; default: the one of the Darknet the cfg was written for
            (:func:`kprune.darknet.cfg.default_bn_formula`).

    Returns:
        A functional model whose outputs are the detection heads in cfg order (or the last layer if
        the cfg has no head).

    Raises:
        CfgError: the cfg does not parse, or a layer cannot be built (message names the layer).
        ValueError: invalid overrides or an unknown batch-norm formula.
    """
    if not isinstance(cfg, DarknetCfg):
        cfg = read_cfg(cfg)
    formula = bn_formulas.bn_formula(bn_formula or default_bn_formula(cfg)).name
    cfg = adapt_cfg(cfg, input_size=input_size, classes=classes, width=width)
    if name is None:
        name = os.path.splitext(os.path.basename(cfg.source))[0] if cfg.source != "<cfg>" else "darknet"
    name = name.replace(" ", "_")
    if backbone_end is None:
        backbone_end = trunk_end(cfg)
    elif not 0 <= backbone_end < len(cfg.layers):
        raise ValueError(f"backbone end {backbone_end}: the cfg has layers 0..{len(cfg.layers) - 1}")
    inputs = keras.Input(shape=cfg.input_shape, name="image")
    x = inputs
    outputs: List = []
    heads: List = []
    backbone = None
    for section in cfg.layers:
        if backbone is None and backbone_end is not None and section.index > backbone_end:
            backbone = [outputs[backbone_end]._keras_history.layer.name]
        try:
            x = _layer(section, outputs, x, reorg_mode, names, darknet_header, backbone, formula, cfg.net)
        except CfgError:
            raise
        except ValueError as exc:
            raise section.error(f"cannot build: {exc}") from None
        outputs.append(x)
        if section.kind in HEAD_KINDS:
            heads.append(x)
    if not outputs:
        raise CfgError(f"{cfg.source}: the cfg has no layers")
    return keras.Model(inputs, heads or outputs[-1], name=name)


def conv_layers_in_order(model) -> List[Tuple[int, object]]:
    """(cfg index, layer) of every ``conv_N`` Conv2D layer, sorted by N (Darknet's file order).

    Raises:
        ValueError: the model has no ``conv_N`` layers (it was not built from a Darknet cfg).
    """
    found: Dict[int, object] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith("conv_"):
            suffix = layer.name[len("conv_"):]
            if suffix.isdigit():
                found[int(suffix)] = layer
    if not found:
        raise ValueError(f"model {model.name!r} has no Darknet conv layers (named conv_N)")
    return sorted(found.items())
