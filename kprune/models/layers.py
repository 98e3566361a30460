"""Custom layers of the Darknet models, all registered for ``.keras`` save/load with safe_mode.

- :class:`Reorg`: YOLOv2's passthrough, in Darknet's exact form or as plain space-to-depth.
- :class:`DarknetBatchNormalization`: batch norm with Darknet's formula (the original's or the fork's).
- :class:`ChannelSlice`: one of G equal slices of the channels (the fork's ``[route] groups=``).
- :class:`Mish`: the fork's mish in a form that stays accurate in full-integer TFLite.
- :class:`DetectionHead`: identity on the raw output of a YOLO head conv, carrying the head metadata
  (kind, anchors, mask, classes, names, backbone boundary) so that it travels with the saved model.
- :class:`L2Normalization`: SSD's conv4_3 normalisation with a learned per-channel scale.
- :class:`MultiBoxHead`: SSD's output, the per-level box and class predictions flattened and joined,
  carrying the default-box specification, variances, classes, names and backbone boundary.
- :class:`RCNNHead`: identity on Faster R-CNN's five outputs (RPN logits and deltas, proposals, class
  logits, class-specific box deltas), carrying the anchor specification, proposal count, box coder
  weights, classes, names, backbone boundary and FPN level layers.

Every head layer stores ``backbone``: the names of the layers whose outputs end the backbone. The
backbone is those layers and everything they depend on, so the split travels with the model file
(renamed, pruned, resized) rather than living in a table keyed by model name.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from kprune._keras import keras, tf
from kprune.models.bn_formulas import bn_formula
from kprune.models.roi import FPN_RATIOS, FPN_SIZES, FPN_STRIDES, ROI_BOX_WEIGHTS, Proposals, RoIAlign, fpn_anchors

REORG_MODES = ("darknet", "space_to_depth")
HEAD_KINDS = ("region", "yolo")


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="kprune")(cls)


@_serializable
class Reorg(keras.layers.Layer):
    """YOLOv2's reorg (passthrough) layer: (H, W, C) -> (H/s, W/s, C*s*s).

    Modes:
        ``darknet``: bit-for-bit Darknet. Darknet's reorg reinterprets the NCHW buffer as
            (C/s², s·H, s·W), applies space-to-depth with block s (block offset major), and
            reinterprets the result as (s²·C, H/s, W/s). Weights trained in Darknet need this.
        ``space_to_depth``: ``tf.nn.space_to_depth`` (YAD2K, keras-yolo2); same shape, different
            channel order and spatial grouping.

    Args:
        stride: block size s.
        mode: one of :data:`REORG_MODES`.

    Raises:
        ValueError: unknown mode, stride < 2, or (when built) an input whose height or width is not a
            multiple of s, or (darknet mode) whose channel count is not a multiple of s².
    """

    def __init__(self, stride: int = 2, mode: str = "darknet", **kwargs):
        super().__init__(**kwargs)
        if mode not in REORG_MODES:
            raise ValueError(f"Reorg mode {mode!r} is not one of {REORG_MODES}")
        if int(stride) < 2:
            raise ValueError(f"Reorg stride must be at least 2, got {stride}")
        self.stride = int(stride)
        self.mode = mode

    def build(self, input_shape):
        _, height, width, channels = input_shape
        s = self.stride
        for name, size in (("height", height), ("width", width)):
            if size is not None and size % s:
                raise ValueError(f"layer {self.name}: input {name} {size} is not a multiple of stride {s}")
        if self.mode == "darknet" and channels % (s * s):
            raise ValueError(
                f"layer {self.name}: darknet reorg needs channels divisible by {s * s}, got {channels}"
            )
        super().build(input_shape)

    def call(self, inputs):
        s = self.stride
        if self.mode == "space_to_depth":
            return tf.nn.space_to_depth(inputs, s)
        shape = tf.shape(inputs)
        height, width = shape[1], shape[2]
        channels = inputs.shape[-1]
        x = tf.transpose(inputs, [0, 3, 1, 2])  # the NCHW buffer Darknet works on
        x = tf.reshape(x, [-1, channels // (s * s), height * s, width * s])
        x = tf.transpose(x, [0, 2, 3, 1])
        x = tf.nn.space_to_depth(x, s)  # (N, H, W, C), block offset major
        x = tf.transpose(x, [0, 3, 1, 2])
        x = tf.reshape(x, [-1, channels * s * s, height // s, width // s])
        return tf.transpose(x, [0, 2, 3, 1])

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        s = self.stride
        return tf.TensorShape([n, None if h is None else h // s, None if w is None else w // s, c * s * s])

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: reorg has no weights to prune."""
        return []

    def get_config(self):
        return {**super().get_config(), "stride": self.stride, "mode": self.mode}


@_serializable
class DarknetBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with a Darknet formula (:mod:`kprune.models.bn_formulas`).

    pjreddie's Darknet normalizes with ``(x - mean) / (sqrt(variance) + 1e-6)`` (``formula="original"``),
    AlexeyAB's fork with ``(x - mean) / sqrt(variance + 1e-5)`` (``formula="alexeyab"``); Keras' own
    layer uses ``sqrt(variance + 1e-3)``, which is visibly different for channels with small variance.
    The weights are Keras' (gamma, beta, moving_mean, moving_variance) and hold exactly the values of the
    Darknet file (scales, biases, rolling_mean, rolling_variance), so conversion is lossless both ways.

    In training mode the batch mean and (biased) variance are used (of the global batch under a
    multi-replica tf.distribute strategy) with the same formula, and the moving statistics updated
    with ``momentum`` (Darknet: 0.99; Darknet's batch variance divides by N - 1, which only matters for
    tiny batches). A layer with ``trainable=False`` always runs in inference mode,
    as Keras 2's BatchNormalization does.

    Args:
        momentum: of the moving statistics.
        epsilon: the formula's constant; None for the formula's own (1e-6 original, 1e-5 alexeyab).
        formula: a key of :data:`~kprune.models.bn_formulas.BN_FORMULAS`.

    Raises:
        ValueError: an unknown formula.
    """

    def __init__(self, momentum: float = 0.99, epsilon: Optional[float] = None, formula: str = "original",
                 **kwargs):
        kwargs.pop("axis", None)
        chosen = bn_formula(formula)
        epsilon = chosen.epsilon if epsilon is None else float(epsilon)
        super().__init__(axis=-1, momentum=momentum, epsilon=epsilon, **kwargs)
        self.formula = chosen.name

    def _normalize(self, inputs, mean, variance):
        scale = self.gamma / bn_formula(self.formula).divisor(variance, tf.sqrt, self.epsilon)
        offset = self.beta - mean * scale
        return inputs * tf.cast(scale, inputs.dtype) + tf.cast(offset, inputs.dtype)

    @staticmethod
    def _batch_moments(x):
        """Mean and biased variance over all axes but the channels; under a strategy with several
        replicas, over the global batch (so training on N devices normalizes as on one)."""
        axes = list(range(x.shape.rank - 1))
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return tf.nn.moments(x, axes=axes)
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        total, count = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.reduce_sum(x, axes), count])
        mean = total / count
        # a second pass around the global mean: E[x^2] - E[x]^2 loses the small variances in float32
        squares = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.square(x - mean), axes))
        return mean, squares / count

    def call(self, inputs, training=None):
        if training is None:
            training = keras.backend.learning_phase()
        if not self.trainable:
            training = False

        def train_branch():
            mean, variance = self._batch_moments(tf.cast(inputs, tf.float32))
            decay = 1.0 - self.momentum
            self.moving_mean.assign_sub((self.moving_mean - mean) * decay)
            self.moving_variance.assign_sub((self.moving_variance - variance) * decay)
            return self._normalize(inputs, mean, variance)

        def inference_branch():
            return self._normalize(inputs, self.moving_mean, self.moving_variance)

        return tf.__internal__.smart_cond.smart_cond(training, train_branch, inference_branch)

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: batch norm is never pruned (tfmot only knows the exact
        BatchNormalization class, not subclasses)."""
        return []

    def get_config(self):
        return {**super().get_config(), "formula": self.formula}


@_serializable
class ChannelSlice(keras.layers.Layer):
    """Slice ``group_id`` of ``groups`` equal slices of the channels: channels
    ``group_id * C / groups`` to ``(group_id + 1) * C / groups - 1`` (AlexeyAB's ``[route] groups=G
    group_id=I``, the CSP split of YOLOv4-tiny).

    Args:
        groups: number of equal slices G (at least 1).
        group_id: the slice taken, 0 <= group_id < groups.

    Raises:
        ValueError: groups < 1, a group_id outside 0..groups - 1, or (when built) a channel count that
            is not a multiple of groups.
    """

    def __init__(self, groups: int = 2, group_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        if int(groups) < 1 or not 0 <= int(group_id) < int(groups):
            raise ValueError(f"channel slice group_id={group_id} of groups={groups}: "
                             "needs groups >= 1 and 0 <= group_id < groups")
        self.groups = int(groups)
        self.group_id = int(group_id)

    def build(self, input_shape):
        if input_shape[-1] % self.groups:
            raise ValueError(f"layer {self.name}: {input_shape[-1]} channels do not split into {self.groups} "
                             "equal groups")
        super().build(input_shape)

    def call(self, inputs):
        width = inputs.shape[-1] // self.groups
        return inputs[..., self.group_id * width: (self.group_id + 1) * width]

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([*input_shape[:-1], input_shape[-1] // self.groups])

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: a slice has no weights."""
        return []

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "group_id": self.group_id}


@_serializable
class Mish(keras.layers.Layer):
    """Mish, ``x * tanh(softplus(x))``, with softplus written as ``relu(x) + log(1 + exp(-|x|))`` and
    ``-|x|`` as ``x - 2 relu(x)`` (TFLite's NEG has no int8 kernel).

    The same function as Keras' ``mish`` activation (to float32 rounding), for TFLite: the converter
    lowers Keras' softplus to ``LOG(ADD(EXP(x), 1))``, and in a full-integer model ``EXP(x)`` is one
    int8 tensor spanning ``0 .. exp(max x)``, so for activations up to 11 every ``exp(x)`` below about
    235 rounds to 0 and mish outputs 0 for all ``x`` under about 5 (measured: max error 5.7 on
    outputs up to 11). Here ``exp(-|x|)`` lies in ``(0, 1]`` and ``1 + exp(-|x|)`` in ``(1, 2]``, so
    each int8 tensor keeps its resolution (max error 0.15 on the same outputs, 2 output steps).
    TFLite ops: RELU, MUL, SUB, EXP, ADD, LOG, ADD, TANH, MUL, all int8 in a full-integer model.
    """

    def call(self, inputs):
        positive = tf.nn.relu(inputs)
        softplus = positive + tf.math.log(1.0 + tf.exp(inputs - 2.0 * positive))
        return inputs * tf.tanh(softplus)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: an activation has no weights."""
        return []


@_serializable
class DetectionHead(keras.layers.Layer):
    """Identity on a head conv's raw output, (N, H, W, A·(5+classes)), carrying the head metadata.

    Channel ``a·(5+classes) + e`` holds entry e (tx, ty, tw, th, objectness, class scores...) of
    anchor a, as in Darknet's memory layout.

    Args:
        kind: ``region`` (YOLOv2: anchors in grid cells, softmax classes) or ``yolo`` (YOLOv3:
            anchors in input pixels, sigmoid classes).
        anchors: all (w, h) anchor pairs of the cfg section.
        classes: number of classes.
        mask: indices of the anchors this head predicts (yolo); None means all of them.
        names: optional class names, in label order.
        darknet_header: [major, minor, revision, seen] of the .weights file the model came from, so
            that exporting reproduces it.
        backbone: names of the layers that end the backbone (see the module docstring); None when
            the model's backbone is not known.
        scale_x_y: AlexeyAB's ``[yolo] scale_x_y`` s: the centre is
            ``(sigmoid(tx) * s - (s - 1) / 2 + col) / grid_w`` (1: YOLOv3's own decoding).
        new_coords: AlexeyAB's ``[yolo] new_coords``: 0 for YOLOv3's coordinates; 1 when the head conv
            applies the logistic itself (no sigmoid here) and ``w = (2 * p_w)^2 * anchor_w``.
        loss_settings: the fork's ``[yolo]`` loss keys of the cfg (``iou_loss``, ``iou_normalizer``,
            ``cls_normalizer``, ``obj_normalizer``), the defaults of kprune's YOLO loss for this model;
            None for models without them.
        darknet_options: the text of the cfg sections the model does not otherwise carry, so that
            :mod:`kprune.darknet.writer` writes them back: ``{"net": {key: value}, "section": {key:
            value}}``, every ``key=value`` of the ``[net]`` section and of this head's own section as
            written in the cfg, in file order (values of keys the model carries itself, such as the
            input size or the classes, are taken from the model instead); None for models saved
            before it was stored, and for heads not built from a cfg.

    Raises:
        ValueError: unknown kind, anchors that are not pairs, classes < 1, a mask out of range,
            names whose count is not ``classes``, scale_x_y <= 0, new_coords not 0 or 1,
            scale_x_y / new_coords other than 1 / 0 on a region head, or
            darknet_options that are not a dict of ``net`` / ``section`` dicts.
    """

    def __init__(
        self,
        kind: str,
        anchors: Sequence[Sequence[float]],
        classes: int,
        mask: Optional[Sequence[int]] = None,
        names: Optional[Sequence[str]] = None,
        darknet_header: Optional[Sequence[int]] = None,
        backbone: Optional[Sequence[str]] = None,
        scale_x_y: float = 1.0,
        new_coords: int = 0,
        loss_settings: Optional[dict] = None,
        darknet_options: Optional[dict] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not float(scale_x_y) > 0 or int(new_coords) not in (0, 1) or int(new_coords) != new_coords:
            raise ValueError(f"head scale_x_y={scale_x_y} must be positive and new_coords={new_coords} 0 or 1")
        if kind == "region" and (float(scale_x_y) != 1.0 or int(new_coords) != 0):
            raise ValueError(f"a region head has no scale_x_y / new_coords (got {scale_x_y} / {new_coords})")
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind {kind!r} is not one of {HEAD_KINDS}")
        anchors = [[float(v) for v in pair] for pair in anchors]
        if not anchors or any(len(pair) != 2 for pair in anchors):
            raise ValueError(f"head anchors must be (w, h) pairs, got {anchors}")
        if int(classes) < 1:
            raise ValueError(f"head classes must be at least 1, got {classes}")
        mask = list(range(len(anchors))) if mask is None else [int(m) for m in mask]
        if any(not 0 <= m < len(anchors) for m in mask):
            raise ValueError(f"head mask {mask} refers to anchors outside 0..{len(anchors) - 1}")
        if names is not None and len(names) != int(classes):
            raise ValueError(f"head has {classes} classes but {len(names)} names were given")
        self.kind = kind
        self.anchors = anchors
        self.classes = int(classes)
        self.mask = mask
        self.names = None if names is None else [str(n) for n in names]
        self.darknet_header = None if darknet_header is None else [int(v) for v in darknet_header]
        self.backbone = None if backbone is None else [str(n) for n in backbone]
        self.scale_x_y = float(scale_x_y)
        self.new_coords = int(new_coords)
        self.loss_settings = None if loss_settings is None else dict(loss_settings)
        if darknet_options is not None and (
                not isinstance(darknet_options, dict) or set(darknet_options) - {"net", "section"}
                or not all(isinstance(v, dict) for v in darknet_options.values())):
            raise ValueError(f"head darknet_options must be a dict of 'net' and 'section' dicts, got {darknet_options!r}")
        self.darknet_options = None if darknet_options is None else {
            part: {str(k): str(v) for k, v in options.items()} for part, options in darknet_options.items()}

    @property
    def head_anchors(self) -> List[List[float]]:
        """The (w, h) anchors this head predicts, in channel order."""
        return [self.anchors[m] for m in self.mask]

    @property
    def num_anchors(self) -> int:
        return len(self.mask)

    @property
    def channels(self) -> int:
        return self.num_anchors * (5 + self.classes)

    def build(self, input_shape):
        if input_shape[-1] != self.channels:
            raise ValueError(
                f"layer {self.name}: a {self.kind} head with {self.num_anchors} anchors and "
                f"{self.classes} classes needs {self.channels} channels, got {input_shape[-1]}"
            )
        super().build(input_shape)

    def call(self, inputs):
        return tf.identity(inputs)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: a head has no weights."""
        return []

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "anchors": self.anchors,
            "classes": self.classes,
            "mask": self.mask,
            "names": self.names,
            "darknet_header": self.darknet_header,
            "backbone": self.backbone,
            "scale_x_y": self.scale_x_y,
            "new_coords": self.new_coords,
            "loss_settings": self.loss_settings,
            "darknet_options": self.darknet_options,
        }


@_serializable
class L2Normalization(keras.layers.Layer):
    """x / ||x|| over the channels, times a learned per-channel scale (SSD's conv4_3_norm, Liu et al.
    2016: ParseNet's normalisation, the scale initialised to 20).

    Computed as ``tf.math.l2_normalize`` (x / sqrt(max(sum x^2, epsilon))), which TFLite converts to
    its L2_NORMALIZATION op: a division by the norm would become an int8 DIV, which fails wherever
    the quantized norm rounds to zero.

    Args:
        scale: initial value of every channel's scale.
        epsilon: floor of the squared norm (Caffe's Normalize adds 1e-10 to it), so an all-zero
            position stays zero.
    """

    def __init__(self, scale: float = 20.0, epsilon: float = 1e-10, **kwargs):
        super().__init__(**kwargs)
        self.initial_scale = float(scale)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],),
                                     initializer=keras.initializers.Constant(self.initial_scale))
        super().build(input_shape)

    def call(self, inputs):
        return tf.math.l2_normalize(inputs, axis=-1, epsilon=self.epsilon) * tf.cast(self.gamma, inputs.dtype)

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: the scale is one value per channel, never pruned."""
        return []

    def get_config(self):
        return {**super().get_config(), "scale": self.initial_scale, "epsilon": self.epsilon}


@_serializable
class MultiBoxHead(keras.layers.Layer):
    """SSD's output: the box and class predictions of every feature map, flattened and joined.

    Called on ``[box_0, class_0, box_1, class_1, ...]``, one pair per feature map: ``box_k``
    (N, H, W, A_k * 4) and ``class_k`` (N, H, W, A_k * (classes + 1)). Returns (N, P, 4 + classes + 1):
    per default box (feature maps in order, then rows, columns and the boxes of a location) its
    encoded offsets in the order (ty, tx, th, tw) and its class logits, background first. That order
    is the one of TFLite's detection post-processing op.

    Args:
        classes: object classes (background not counted).
        priors: per feature map a dict: ``min_size``, ``max_size`` (or None), ``aspect_ratios``
            (each r adds r and 1/r), ``step`` (cell size, or None for 1 / map size), ``offset``; sizes
            and steps are fractions of the input side.
        variances: the box coder's (centre, size) variances, SSD's (0.1, 0.2).
        names: optional class names.
        backbone: names of the layers that end the backbone.

    Raises:
        ValueError: classes < 1, names of the wrong count, a prior spec without min_size, or
            (when built) inputs whose channels do not fit the boxes per location.
    """

    def __init__(self, classes: int, priors: Sequence[dict], variances: Sequence[float] = (0.1, 0.2),
                 names: Optional[Sequence[str]] = None, backbone: Optional[Sequence[str]] = None, **kwargs):
        super().__init__(**kwargs)
        if int(classes) < 1:
            raise ValueError(f"classes must be at least 1, got {classes}")
        if names is not None and len(names) != int(classes):
            raise ValueError(f"head has {classes} classes but {len(names)} names were given")
        self.classes = int(classes)
        self.priors = [prior_spec(p) for p in priors]
        self.variances = [float(v) for v in variances]
        self.names = None if names is None else [str(n) for n in names]
        self.backbone = None if backbone is None else [str(n) for n in backbone]

    def boxes_per_location(self) -> List[int]:
        return [1 + (p["max_size"] is not None) + 2 * len(p["aspect_ratios"]) for p in self.priors]

    def build(self, input_shape):
        shapes = list(input_shape)
        if len(shapes) != 2 * len(self.priors):
            raise ValueError(f"layer {self.name}: {len(self.priors)} feature maps need {2 * len(self.priors)} inputs "
                             f"(box and class predictions of each), got {len(shapes)}")
        for k, count in enumerate(self.boxes_per_location()):
            box, cls = shapes[2 * k], shapes[2 * k + 1]
            if box[-1] != count * 4 or cls[-1] != count * (self.classes + 1):
                raise ValueError(f"layer {self.name}: feature map {k} has {count} boxes per location, so its "
                                 f"predictions need {count * 4} and {count * (self.classes + 1)} channels, got "
                                 f"{box[-1]} and {cls[-1]}")
        super().build(input_shape)

    def feature_sizes(self) -> List[tuple]:
        """(height, width) of each feature map."""
        return [tuple(int(v) for v in shape[1:3]) for shape in self.input_shape[0::2]]

    def call(self, inputs):
        flat = []
        for box, cls, count in zip(inputs[0::2], inputs[1::2], self.boxes_per_location()):
            batch = tf.shape(box)[0]
            known = box.shape[1] is not None and box.shape[2] is not None
            boxes = box.shape[1] * box.shape[2] * count if known else -1  # static when the size is fixed
            flat.append(tf.concat([tf.reshape(box, [batch, boxes, 4]),
                                   tf.reshape(cls, [batch, boxes, self.classes + 1])], axis=-1))
        return tf.concat(flat, axis=1)

    def compute_output_shape(self, input_shape):
        total = 0
        for shape, count in zip(input_shape[0::2], self.boxes_per_location()):
            if shape[1] is None or shape[2] is None:
                total = None
                break
            total += shape[1] * shape[2] * count
        return tf.TensorShape([input_shape[0][0], total, 4 + self.classes + 1])

    def get_prunable_weights(self) -> list:
        return []

    def get_config(self):
        return {**super().get_config(), "classes": self.classes, "priors": self.priors,
                "variances": self.variances, "names": self.names, "backbone": self.backbone}


def prior_spec(spec: dict) -> dict:
    """A default-box specification with every key filled in and checked (see :class:`MultiBoxHead`).

    Raises:
        ValueError: unknown keys, or sizes, steps and ratios that are not positive.
    """
    known = ("min_size", "max_size", "aspect_ratios", "step", "offset")
    unknown = sorted(set(spec) - set(known))
    if unknown or "min_size" not in spec:
        raise ValueError(f"prior spec {spec}: needs min_size; known keys {', '.join(known)}")
    out = {"min_size": float(spec["min_size"]),
           "max_size": None if spec.get("max_size") is None else float(spec["max_size"]),
           "aspect_ratios": [float(r) for r in spec.get("aspect_ratios", ())],
           "step": None if spec.get("step") is None else float(spec["step"]),
           "offset": float(spec.get("offset", 0.5))}
    values = [out["min_size"], *out["aspect_ratios"]] + [v for v in (out["max_size"], out["step"]) if v is not None]
    if min(values) <= 0:
        raise ValueError(f"prior spec {spec}: sizes, steps and aspect ratios must be positive")
    return out


@_serializable
class RCNNHead(keras.layers.Layer):
    """Identity on the five outputs of a Faster R-CNN with FPN, carrying what decoding, training and
    export need from the model file alone.

    Called on ``[rpn_logits, rpn_deltas, proposals, class_logits, box_deltas]``, returns them
    unchanged, in that order:

    - ``rpn_logits`` (N, A): the RPN's objectness logit of every anchor (:meth:`anchors` order);
    - ``rpn_deltas`` (N, A, 4): its (dx, dy, dw, dh) against the anchor, box coder weights 1;
    - ``proposals`` (N, K, 4): xyxy in [0, 1], zero rows beyond the kept ones (no gradient);
    - ``class_logits`` (N, K, classes + 1): per proposal, background first;
    - ``box_deltas`` (N, K, classes, 4): per proposal and class (background has none), (dx, dy,
      dw, dh) against the proposal with the weights ``box_weights``.

    Args:
        classes: object classes (background not counted).
        input_size: the square input side in pixels (the anchors depend on it).
        strides, sizes, ratios: of :func:`~kprune.models.roi.fpn_anchors`.
        proposals: K, proposals per image.
        box_weights: the ROI heads' box coder weights (wx, wy, ww, wh), detectron2's (10, 10, 5, 5).
        names: optional class names.
        backbone: names of the layers that end the backbone.
        features: names of the layers that output the FPN levels (P2 .. P6), which end the FPN.

    Raises:
        ValueError: classes < 1, names of the wrong count, box weights that are not four positive
            numbers, or (when built) inputs whose shapes do not fit the anchors, K and the classes.
    """

    #: the outputs, in order
    OUTPUTS = ("rpn_logits", "rpn_deltas", "proposals", "class_logits", "box_deltas")

    def __init__(self, classes: int, input_size: int, strides: Sequence[int] = FPN_STRIDES,
                 sizes: Sequence[float] = FPN_SIZES, ratios: Sequence[float] = FPN_RATIOS, proposals: int = 1000,
                 box_weights: Sequence[float] = ROI_BOX_WEIGHTS, names: Optional[Sequence[str]] = None,
                 backbone: Optional[Sequence[str]] = None, features: Optional[Sequence[str]] = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(classes, bool) or int(classes) != classes or int(classes) < 1:
            raise ValueError(f"classes must be a whole number of at least 1, got {classes}")
        if names is not None and len(names) != int(classes):
            raise ValueError(f"head has {classes} classes but {len(names)} names were given")
        if isinstance(proposals, bool) or int(proposals) != proposals or int(proposals) < 1:
            raise ValueError(f"proposals must be a whole number of at least 1, got {proposals}")
        weights = [float(w) for w in box_weights]
        if len(weights) != 4 or min(weights) <= 0:
            raise ValueError(f"box_weights {list(box_weights)}: need four positive numbers (wx, wy, ww, wh)")
        self.classes = int(classes)
        self.input_size = int(input_size)
        self.strides = [int(v) for v in strides]
        self.sizes = [float(v) for v in sizes]
        self.ratios = [float(v) for v in ratios]
        self.proposals = int(proposals)
        self.box_weights = weights
        self.names = None if names is None else [str(n) for n in names]
        self.backbone = None if backbone is None else [str(n) for n in backbone]
        self.features = None if features is None else [str(n) for n in features]
        self.num_anchors = len(self.anchors())  # checks input_size, strides, sizes, ratios

    def anchors(self) -> np.ndarray:
        """The RPN's anchors, (A, 4) xyxy normalised (:func:`~kprune.models.roi.fpn_anchors`)."""
        return fpn_anchors(self.input_size, self.strides, self.sizes, self.ratios)

    def _expected(self):
        a, k, c = self.num_anchors, self.proposals, self.classes
        return [(a,), (a, 4), (k, 4), (k, c + 1), (k, c, 4)]

    def build(self, input_shape):
        shapes = [tuple(tf.TensorShape(s).as_list()) for s in input_shape] \
            if isinstance(input_shape, (list, tuple)) else []
        expected = self._expected()
        if len(shapes) != len(expected) or any(s[1:] != e for s, e in zip(shapes, expected)):
            wanted = ", ".join(f"{n} (N, {', '.join(map(str, e))})" for n, e in zip(self.OUTPUTS, expected))
            raise ValueError(f"layer {self.name}: inputs must be {wanted}; got {shapes}")
        super().build(input_shape)

    def call(self, inputs):
        return [tf.identity(t) for t in inputs]

    def compute_output_shape(self, input_shape):
        return [tf.TensorShape(s) for s in input_shape]

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: a head has no weights."""
        return []

    def get_config(self):
        return {**super().get_config(), "classes": self.classes, "input_size": self.input_size,
                "strides": self.strides, "sizes": self.sizes, "ratios": self.ratios, "proposals": self.proposals,
                "box_weights": self.box_weights, "names": self.names, "backbone": self.backbone,
                "features": self.features}


#: the layers that end a detector and carry its metadata
HEAD_LAYERS = (DetectionHead, MultiBoxHead, RCNNHead)

CUSTOM_OBJECTS = {
    "Reorg": Reorg,
    "DarknetBatchNormalization": DarknetBatchNormalization,
    "ChannelSlice": ChannelSlice,
    "DetectionHead": DetectionHead,
    "L2Normalization": L2Normalization,
    "MultiBoxHead": MultiBoxHead,
    "RCNNHead": RCNNHead,
    "RoIAlign": RoIAlign,
    "Proposals": Proposals,
}


def detection_heads(model) -> list:
    """The model's head layers (:data:`HEAD_LAYERS`) in output order, each once (a head with several
    outputs, such as :class:`RCNNHead`, at its first output).

    Raises:
        ValueError: the model has no head layer among its outputs.
    """
    by_output = {id(t): layer for layer in model.layers if isinstance(layer, HEAD_LAYERS)
                 for t in tf.nest.flatten(layer.output)}
    heads = []
    for t in model.outputs:
        layer = by_output.get(id(t))
        if layer is not None and all(layer is not h for h in heads):
            heads.append(layer)
    if not heads:
        raise ValueError(f"model {model.name!r} has no detection head among its outputs: it was not built by "
                         "kprune (a Darknet cfg, or a detector family such as ssd300-vgg16), so kprune does not "
                         "know how to decode, train or export it")
    return heads
