"""Geometry and layers of a Faster R-CNN with FPN (the detectron2 / torchvision recipe).

Coordinates are normalised to the square input (0 .. 1 across ``input_size`` pixels) and boxes are
``xyxy`` (x_min, y_min, x_max, y_max), unless a docstring says otherwise.

- :func:`level_sizes`, :func:`anchors_per_level`, :func:`fpn_anchors`: the FPN levels' feature-map
  sides and the RPN's anchors, one size per level, in the order of the RPN head's flattened outputs.
- :func:`encode`, :func:`decode`: detectron2's ``Box2BoxTransform`` (deltas dx, dy, dw, dh with
  weights; (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the ROI heads).
- :func:`assign_levels`, :class:`RoIAlign`: detectron2's level rule and ROIAlign over the FPN
  levels, as TFLite builtin ops.
- :func:`propose`, :class:`Proposals`: the RPN's proposals (top-k per level, decoding, clipping,
  NMS), a fixed number per image, as TFLite builtin ops.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from kprune._keras import keras, tf

#: FPN levels P2-P6 of a ResNet: stride 2**level
FPN_STRIDES = (4, 8, 16, 32, 64)
#: one anchor size (side of the square anchor, pixels) per level, detectron2's default
FPN_SIZES = (32, 64, 128, 256, 512)
#: anchor aspect ratios h / w, detectron2's default
FPN_RATIOS = (0.5, 1.0, 2.0)
#: detectron2's clamp of dw, dh before exp: log(1000 / 16)
DELTA_CLIP = math.log(1000.0 / 16)
#: the ROI heads' box coder weights (wx, wy, ww, wh); the RPN uses (1, 1, 1, 1)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _check_input_size(input_size) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size < 1:
        raise ValueError(f"input_size {input_size!r}: must be a positive integer (pixels)")
    return int(input_size)


def _check_positive(key: str, values, integer: bool = False) -> tuple:
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{key} {values!r}: must be a sequence of positive numbers") from None
    kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if not values or any(isinstance(v, bool) or not isinstance(v, kind) or not v > 0 for v in values):
        what = "integers" if integer else "numbers"
        raise ValueError(f"{key} {values!r}: must be a non-empty sequence of positive {what}")
    return tuple(int(v) for v in values) if integer else tuple(float(v) for v in values)


def level_sizes(input_size: int, strides: Sequence[int] = FPN_STRIDES) -> List[int]:
    """The side of each FPN level's feature map: ``ceil(input_size / stride)``.

    These are the sides the ResNet / FPN builder gives with ``'same'`` padding (every stride-2 conv
    or pool of a 'same'-padded network maps a side n to ceil(n / 2), and ceil(ceil(n / a) / b) =
    ceil(n / ab)).

    Raises:
        ValueError: ``input_size`` not a positive integer, or a stride that is not.
    """
    input_size = _check_input_size(input_size)
    strides = _check_positive("strides", strides, integer=True)
    return [-(-input_size // s) for s in strides]


def anchors_per_level(input_size: int, strides: Sequence[int] = FPN_STRIDES, sizes: Sequence[float] = FPN_SIZES,
                      ratios: Sequence[float] = FPN_RATIOS) -> List[np.ndarray]:
    """The anchors of each level as a list of ``(H * W * len(ratios), 4)`` float32 arrays; see
    :func:`fpn_anchors` for the conventions.

    Raises:
        ValueError: see :func:`fpn_anchors`.
    """
    input_size = _check_input_size(input_size)
    strides = _check_positive("strides", strides, integer=True)
    sizes = _check_positive("sizes", sizes)
    ratios = _check_positive("ratios", ratios)
    if len(sizes) != len(strides):
        raise ValueError(f"sizes {sizes} and strides {strides}: need one anchor size per level "
                         f"({len(strides)} levels, {len(sizes)} sizes)")
    levels = []
    for stride, size, side in zip(strides, sizes, level_sizes(input_size, strides)):
        centres = (np.arange(side, dtype=np.float64) + 0.5) * stride
        cy, cx = np.meshgrid(centres, centres, indexing="ij")  # row-major: y, then x
        root = np.sqrt(np.asarray(ratios, np.float64))
        half_w, half_h = size / root / 2, size * root / 2  # ratio r = h / w, area size^2
        boxes = np.stack([cx[..., None] - half_w, cy[..., None] - half_h,
                          cx[..., None] + half_w, cy[..., None] + half_h], axis=-1)  # (H, W, ratios, 4)
        levels.append((boxes.reshape(-1, 4) / input_size).astype(np.float32))
    return levels


def fpn_anchors(input_size: int, strides: Sequence[int] = FPN_STRIDES, sizes: Sequence[float] = FPN_SIZES,
                ratios: Sequence[float] = FPN_RATIOS) -> np.ndarray:
    """The RPN's anchors over all FPN levels, ``(A, 4)`` float32, xyxy normalised to the input.

    One anchor size per level (``sizes[l]`` pixels at stride ``strides[l]``), on a feature map of
    side ``ceil(input_size / stride)`` (:func:`level_sizes`). Order: level by level; within a level
    row-major (y, then x); within a cell the ratios in the given order, so that an RPN head output
    ``(N, H, W, len(ratios))`` reshaped to ``(N, H * W * len(ratios))`` and joined over the levels
    lines up with these rows. For a ratio r = h / w the anchor keeps the area size^2:
    ``w = size / sqrt(r)``, ``h = size * sqrt(r)`` (detectron2's convention).

    Cell (i, j) is centred at ``((j + 0.5) * stride, (i + 0.5) * stride)`` pixels. detectron2's
    ``DefaultAnchorGenerator`` puts the centres at ``j * stride`` (offset 0.0); the half-cell centre
    is used here because it is the centre of the cell and makes the anchor grid symmetric about the
    image centre when the stride divides the input (the first and last centres half a stride from
    the borders; with offset 0 the grid is shifted half a stride to the top left, so a mirrored
    image does not meet mirrored anchors). Weights trained with detectron2's offset 0 see their
    anchors moved by half a stride. Anchors are not clipped to the image.

    Raises:
        ValueError: ``input_size`` not a positive integer; strides, sizes or ratios not positive;
            a different number of sizes and strides.
    """
    return np.concatenate(anchors_per_level(input_size, strides, sizes, ratios))


def _box_weights(weights) -> tuple:
    weights = _check_positive("box coder weights", weights)
    if len(weights) != 4:
        raise ValueError(f"box coder weights {weights}: need four (wx, wy, ww, wh)")
    return weights


def _centres_and_sizes(boxes):
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * width, boxes[..., 1] + 0.5 * height, width, height


def encode(boxes, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
    """Boxes against anchors as deltas ``(dx, dy, dw, dh)`` (detectron2's ``Box2BoxTransform``):
    ``dx = wx (cx - cx_a) / w_a``, ``dy = wy (cy - cy_a) / h_a``, ``dw = ww log(w / w_a)``,
    ``dh = wh log(h / h_a)``.

    Args:
        boxes: ``(..., 4)`` xyxy, broadcast against ``anchors``.
        anchors: ``(..., 4)`` xyxy, with positive width and height.
        weights: ``(wx, wy, ww, wh)``: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the ROI heads.

    Returns:
        float32 tensor ``(..., 4)``. A box's width and height are floored at 1e-8 before the log so
        that all-zero padding rows give large finite deltas instead of -inf (mask them out of a loss).

    Raises:
        ValueError: weights not four positive numbers.
    """
    wx, wy, ww, wh = _box_weights(weights)
    boxes = tf.cast(boxes, tf.float32)
    anchors = tf.cast(anchors, tf.float32)
    cx, cy, w, h = _centres_and_sizes(boxes)
    cx_a, cy_a, w_a, h_a = _centres_and_sizes(anchors)
    w, h = tf.maximum(w, 1e-8), tf.maximum(h, 1e-8)
    return tf.stack([wx * (cx - cx_a) / w_a, wy * (cy - cy_a) / h_a,
                     ww * tf.math.log(w / w_a), wh * tf.math.log(h / h_a)], axis=-1)


def decode(deltas, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clip: float = DELTA_CLIP):
    """Deltas ``(dx, dy, dw, dh)`` applied to anchors: the inverse of :func:`encode`, with ``dw / ww``
    and ``dh / wh`` clamped at ``clip`` before the exp (detectron2's ``scale_clamp``, log(1000 / 16):
    no box grows more than 62.5 times its anchor).

    Args:
        deltas: ``(..., 4)``, broadcast against ``anchors``.
        anchors: ``(..., 4)`` xyxy.
        weights: as for :func:`encode`.
        clip: upper bound of the log size change.

    Returns:
        float32 tensor ``(..., 4)`` xyxy, not clipped to the image.

    Raises:
        ValueError: weights not four positive numbers.
    """
    wx, wy, ww, wh = _box_weights(weights)
    deltas = tf.cast(deltas, tf.float32)
    anchors = tf.cast(anchors, tf.float32)
    cx_a, cy_a, w_a, h_a = _centres_and_sizes(anchors)
    cx = deltas[..., 0] / wx * w_a + cx_a
    cy = deltas[..., 1] / wy * h_a + cy_a
    w = tf.exp(tf.minimum(deltas[..., 2] / ww, clip)) * w_a
    h = tf.exp(tf.minimum(deltas[..., 3] / wh, clip)) * h_a
    return tf.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="kprune")(cls)


def assign_levels(boxes, input_size: int, min_level: int, max_level: int, canonical_size: float = 224.0,
                  canonical_level: int = 4):
    """The FPN level each box is pooled from (detectron2's ``assign_boxes_to_levels``, the rule of
    the FPN paper): ``floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))`` with the area
    in pixels^2, clipped to ``min_level .. max_level``. A 224 px box goes to level 4, 112 px to 3,
    448 px to 5; empty boxes to ``min_level``.

    Computed in float32 from normalised coordinates, a box exactly on a boundary (a side of exactly
    112, 224, 448 px) can fall either way by rounding when ``x * input_size`` is not exact in float32
    (detectron2's 1e-8 is below float32's resolution near 1 too); with a power-of-two input size the
    pixel sides are exact and such boxes land as stated.

    Args:
        boxes: ``(..., 4)`` xyxy normalised.
        input_size: the input side in pixels.

    Returns:
        int32 tensor ``(...)``.
    """
    boxes = tf.cast(boxes, tf.float32)
    size = float(input_size)
    width = tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * size
    height = tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0) * size
    ratio = tf.sqrt(width * height) / float(canonical_size) + 1e-8
    level = tf.floor(float(canonical_level) + tf.math.log(ratio) * (1.0 / math.log(2.0)))
    level = tf.clip_by_value(level, float(min_level), float(max_level))
    return tf.cast(level, tf.int32)


def _int_config(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} {value!r}: must be an integer >= {minimum}")
    return int(value)


def _float_config(key: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{key} {value!r}: must be a number")
    if (value <= 0 if positive else value < 0) or not math.isfinite(value):
        raise ValueError(f"{key} {value!r}: must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


@_serializable
class RoIAlign(keras.layers.Layer):
    """detectron2's ``ROIPooler`` with ``ROIAlignV2`` over FPN levels: each box is pooled from one
    level (:func:`assign_levels`) into ``output_size x output_size`` bins.

    Inputs ``[p2, p3, ..., boxes]``: one or more feature maps ``(N, H_l, W_l, C)``, highest resolution
    first (level ``min_level``, then ``min_level + 1``, ...), with static sides and one channel count;
    then ``boxes`` ``(N, K, 4)`` xyxy normalised. Output ``(N, K, output_size, output_size, C)``.

    Level l has stride 2**l: a normalised x becomes the feature coordinate ``x * input_size / 2**l``,
    minus 0.5 when ``aligned`` (the half-pixel offset of ROIAlignV2: pixel centres sit at +0.5). That
    scale is ``W_l`` when the stride divides the input (ResNet-FPN inputs are multiples of 32; P6 is
    not pooled from). Without ``aligned`` the ROI is at least 1 x 1 feature pixel (the legacy ROIAlign).

    Each bin averages ``sampling_ratio^2`` bilinear samples on a regular grid (at (k + 0.5) /
    sampling_ratio of the bin), bilinear as ROIAlign defines it: a sample outside [-1, H] x [-1, W]
    contributes 0 (and still counts in the mean), coordinates below 0 are taken as 0, and at or beyond
    the last row / column the sample takes that row / column. detectron2's ``sampling_ratio=0``
    (adaptive: ceil(roi size / output size) samples, different per box) is not supported: the graph
    has static shapes.

    Implementation, all TFLite builtins (GATHER with batch_dims, BATCH_MATMUL, arithmetic; not
    ``tf.image.crop_and_resize``, which converts only as a Flex op): the levels are flattened to
    ``(N, sum H_l W_l, C)`` and joined; per box and sample axis the coordinates, the two
    neighbours' rows or columns and their weights are computed from the box's level (its offset,
    side and scale gathered from small tables); the four neighbours of every sample are gathered by
    flat index and each bin is one matrix product of its ``4 sampling_ratio^2`` gathered rows with
    their weights. Memory: one ``(N, K output_size^2 4 sampling_ratio^2, C)`` gather (K = 1000,
    7 x 7, 2 x 2, C = 256: 0.8 GB in float32 per image); no per-level copies.

    Args:
        output_size: bins per side (>= 1).
        sampling_ratio: samples per bin side (>= 1).
        aligned: the half-pixel offset (ROIAlignV2, the FPN recipe's default).
        canonical_size, canonical_level: of the level rule (224 px -> level 4).
        min_level: the level of the first feature map (P2: 2); the last map's level is
            ``min_level + maps - 1``.
        input_size: the input side in pixels (required).

    Raises:
        ValueError: a bad config value (naming it), or (when built) no feature maps, maps that are not
            4-d with static sides, different channel counts, sides other than ``ceil(input_size /
            2**level)`` (:func:`level_sizes`: a wrong ``min_level`` or ``input_size``), or boxes not
            ``(N, K, 4)``.
    """

    def __init__(self, output_size: int = 7, sampling_ratio: int = 2, aligned: bool = True,
                 canonical_size: float = 224, canonical_level: int = 4, min_level: int = 2,
                 input_size: int = None, **kwargs):
        super().__init__(**kwargs)
        self.output_size = _int_config("RoIAlign output_size", output_size, 1)
        if not isinstance(sampling_ratio, bool) and sampling_ratio == 0:
            raise ValueError("RoIAlign sampling_ratio 0 (adaptive, detectron2's option) is not supported: the "
                             "graph needs a fixed number of samples; use an integer >= 1")
        self.sampling_ratio = _int_config("RoIAlign sampling_ratio", sampling_ratio, 1)
        if not isinstance(aligned, (bool, np.bool_)):
            raise ValueError(f"RoIAlign aligned {aligned!r}: must be True or False")
        self.aligned = bool(aligned)
        self.canonical_size = _float_config("RoIAlign canonical_size", canonical_size)
        self.canonical_level = _int_config("RoIAlign canonical_level", canonical_level, 0)
        self.min_level = _int_config("RoIAlign min_level", min_level, 0)
        if input_size is None:
            raise ValueError("RoIAlign input_size is required: the input side in pixels")
        self.input_size = _check_input_size(input_size)
        self.levels = None

    def build(self, input_shape):
        shapes = [tf.TensorShape(s) for s in input_shape] if isinstance(input_shape, (list, tuple)) else []
        if len(shapes) < 2:
            raise ValueError(f"layer {self.name}: inputs must be [feature maps..., boxes] with at least one "
                             f"feature map, got {len(shapes)} input(s)")
        *maps, boxes = shapes
        if boxes.rank != 3 or boxes[-1] != 4:
            raise ValueError(f"layer {self.name}: boxes must be (N, K, 4), got {boxes}")
        for k, shape in enumerate(maps):
            if shape.rank != 4 or shape[1] is None or shape[2] is None or shape[3] is None:
                raise ValueError(f"layer {self.name}: feature map {k} must be (N, H, W, C) with static H, W, C, "
                                 f"got {shape}")
        channels = [int(shape[3]) for shape in maps]
        if len(set(channels)) != 1:
            raise ValueError(f"layer {self.name}: feature maps must have equal channel counts, got {channels}")
        self.levels = [(int(shape[1]), int(shape[2])) for shape in maps]
        strides = [2 ** (self.min_level + k) for k in range(len(maps))]
        expected = [(side, side) for side in level_sizes(self.input_size, strides)]
        if self.levels != expected:
            raise ValueError(f"layer {self.name}: feature maps of sides {self.levels} do not fit input_size "
                             f"{self.input_size} and min_level {self.min_level}: levels {self.min_level}.."
                             f"{self.max_level} (strides {strides}) have sides {expected}")
        super().build(input_shape)

    @property
    def max_level(self) -> int:
        return self.min_level + len(self.levels) - 1

    def _axis(self, start, end, side, scale, offset):
        """Per box (B,) the 2 * sampling_ratio neighbour indices along one axis of every bin and
        their weights (the bilinear weight, 0 outside the ROIAlign range, over sampling_ratio):
        (B, output_size, 2 * sampling_ratio) each, samples major, (low, high) minor."""
        out, ratio = self.output_size, self.sampling_ratio
        start = start * scale - offset
        length = end * scale - offset - start
        if not self.aligned:
            length = tf.maximum(length, 1.0)
        steps = (np.arange(out * ratio, dtype=np.float32) + 0.5) / ratio  # sample positions in bins
        coord = start[:, None] + tf.constant(steps)[None, :] * (length / out)[:, None]  # (B, S)
        side_f = tf.cast(side, tf.float32)[:, None]
        inside = tf.cast(tf.logical_and(coord >= -1.0, coord <= side_f), tf.float32)
        coord = tf.minimum(tf.maximum(coord, 0.0), side_f - 1.0)
        low = tf.floor(coord)
        frac = coord - low
        low = tf.cast(low, tf.int32)
        high = tf.minimum(low + 1, side[:, None] - 1)
        index = tf.stack([low, high], axis=-1)  # (B, S, 2)
        weight = tf.stack([1.0 - frac, frac], axis=-1) * (inside / ratio)[..., None]
        shape = [-1, out, 2 * ratio]
        return tf.reshape(index, shape), tf.reshape(weight, shape)

    def call(self, inputs):
        *maps, boxes = inputs
        out, ratio = self.output_size, self.sampling_ratio
        channels = maps[0].shape[-1]
        flat = tf.concat([tf.reshape(m, [-1, h * w, channels]) for m, (h, w) in zip(maps, self.levels)], axis=1)
        boxes = tf.cast(boxes, tf.float32)
        shape = tf.shape(boxes)
        batch, count = shape[0], shape[1]
        boxes = tf.reshape(boxes, [-1, 4])  # (B, 4), B = N * K
        level = assign_levels(boxes, self.input_size, self.min_level, self.max_level, self.canonical_size,
                              self.canonical_level) - self.min_level
        heights = np.array([h for h, _ in self.levels], np.int32)
        widths = np.array([w for _, w in self.levels], np.int32)
        offsets = np.cumsum([0] + [h * w for h, w in self.levels[:-1]]).astype(np.int32)
        scales = np.array([self.input_size / 2.0 ** (self.min_level + k) for k in range(len(self.levels))],
                          np.float32)
        height, width = tf.gather(tf.constant(heights), level), tf.gather(tf.constant(widths), level)
        start, scale = tf.gather(tf.constant(offsets), level), tf.gather(tf.constant(scales), level)
        half = 0.5 if self.aligned else 0.0
        rows, row_weights = self._axis(boxes[:, 1], boxes[:, 3], height, scale, half)
        cols, col_weights = self._axis(boxes[:, 0], boxes[:, 2], width, scale, half)
        # (B, out_y, out_x, 2 ratio, 2 ratio): a bin's neighbours and weights (the mean folded in)
        index = (start[:, None, None, None, None] + rows[:, :, None, :, None] * width[:, None, None, None, None]
                 + cols[:, None, :, None, :])
        weight = row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :]
        taps = 4 * ratio * ratio
        values = tf.gather(flat, tf.reshape(index, [batch, -1]), batch_dims=1)  # (N, K out^2 taps, C)
        values = tf.reshape(values, [-1, taps, channels])
        weight = tf.cast(tf.reshape(weight, [-1, 1, taps]), values.dtype)
        pooled = tf.matmul(weight, values)  # (B out^2, 1, C)
        return tf.reshape(pooled, [batch, count, out, out, channels])

    def compute_output_shape(self, input_shape):
        *maps, boxes = [tf.TensorShape(s) for s in input_shape]
        return tf.TensorShape([boxes[0], boxes[1], self.output_size, self.output_size, maps[0][-1]])

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: no weights."""
        return []

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size, "sampling_ratio": self.sampling_ratio,
                "aligned": self.aligned, "canonical_size": self.canonical_size,
                "canonical_level": self.canonical_level, "min_level": self.min_level,
                "input_size": self.input_size}


#: the score given to candidates dropped before NMS, and the NMS score threshold that removes them
_DROPPED = float(np.finfo(np.float32).min)
_DROP_THRESHOLD = -1e38


def _suppress(boxes, scores, count: int, nms_iou: float):
    """One image's greedy NMS (TFLite NON_MAX_SUPPRESSION_V4): ``count`` indices in score order,
    padded with 0, and the number of valid ones."""
    selected, valid = tf.raw_ops.NonMaxSuppressionV4(
        boxes=boxes, scores=scores, max_output_size=count, iou_threshold=nms_iou,
        score_threshold=_DROP_THRESHOLD, pad_to_max_output_size=True)
    return selected, valid


def propose(logits, deltas, anchors: Sequence[np.ndarray], input_size: int, pre_nms_topk: int = 1000,
            count: int = 1000, nms_iou: float = 0.7, min_size: float = 0.0, per_level_nms: bool = True):
    """The RPN's proposals (detectron2's ``find_top_rpn_proposals`` at inference).

    Per level the ``pre_nms_topk`` anchors of highest logit are decoded (weights (1, 1, 1, 1), the
    log(1000 / 16) clamp), clipped to [0, 1], and those whose clipped width or height is not larger
    than ``min_size`` pixels are dropped (detectron2's ``nonempty(min_size)``, strict, so 0 drops
    only empty boxes); then one greedy NMS per image at IoU ``nms_iou`` keeps at most ``count``, in
    decreasing logit over all levels.

    With ``per_level_nms`` (the default), NMS is per level as in detectron2 and torchvision, whose
    ``batched_nms`` takes the level as the category: a box never suppresses one of another level.
    It is done in one NMS op by moving each level's boxes (already in [0, 1]) by 2 * level, so that
    boxes of different levels cannot overlap; the moved coordinates (< 2 * levels) keep about 1e-6 of
    absolute precision, which only matters for an IoU within ~1e-4 of the threshold. Without it,
    one NMS runs across the levels (fewer near-duplicates of one object from neighbouring levels,
    but not what pretrained detectron2 weights were trained with).

    TFLite: TOPK_V2, GATHER, arithmetic, and NON_MAX_SUPPRESSION_V4 inside a WHILE over the batch
    (``tf.map_fn``); no Flex ops.

    Args:
        logits: ``(N, A)`` objectness logits, in :func:`fpn_anchors` order.
        deltas: ``(N, A, 4)`` (dx, dy, dw, dh).
        anchors: the anchors of each level (:func:`anchors_per_level`), ``A`` rows in all.
        input_size: the input side in pixels (for ``min_size``).

    Returns:
        ``(boxes, scores, valid)``: ``(N, count, 4)`` xyxy in [0, 1] and ``(N, count)`` their logits,
        both zero beyond the ``valid`` ``(N,)`` kept ones; gradients stopped.
    """
    logits = tf.cast(logits, tf.float32)
    deltas = tf.cast(deltas, tf.float32)
    boxes, scores, levels, start = [], [], [], 0
    for level, level_anchors in enumerate(anchors):
        size = len(level_anchors)
        k = min(int(pre_nms_topk), size)
        top = tf.math.top_k(logits[:, start:start + size], k=k, sorted=True)
        level_deltas = tf.gather(deltas[:, start:start + size], top.indices, batch_dims=1)
        boxes.append(decode(level_deltas, tf.gather(tf.constant(level_anchors, tf.float32), top.indices)))
        scores.append(top.values)
        levels.append(np.full(k, level, np.float32))
        start += size
    boxes = tf.clip_by_value(tf.concat(boxes, axis=1), 0.0, 1.0)
    scores = tf.concat(scores, axis=1)
    sides = (boxes[..., 2:] - boxes[..., :2]) * float(input_size)
    kept = tf.reduce_min(sides, axis=-1) > float(min_size)
    nms_scores = tf.where(kept, scores, _DROPPED)
    nms_boxes = boxes
    if per_level_nms:
        nms_boxes = boxes + tf.constant(2.0 * np.concatenate(levels))[None, :, None]
    selected, valid = tf.map_fn(
        lambda image: _suppress(image[0], image[1], int(count), float(nms_iou)), (nms_boxes, nms_scores),
        fn_output_signature=(tf.TensorSpec([int(count)], tf.int32), tf.TensorSpec([], tf.int32)))
    mask = tf.cast(tf.range(int(count))[None, :] < valid[:, None], tf.float32)
    boxes = tf.gather(boxes, selected, batch_dims=1) * mask[..., None]
    scores = tf.gather(scores, selected, batch_dims=1) * mask
    return tf.stop_gradient(boxes), tf.stop_gradient(scores), tf.stop_gradient(valid)


@_serializable
class Proposals(keras.layers.Layer):
    """The RPN's proposals as a layer: inputs ``[rpn_logits (N, A), rpn_deltas (N, A, 4)]``, output
    ``(N, count, 4)`` xyxy normalised boxes in [0, 1], in decreasing objectness, zero rows beyond
    the kept ones, gradient stopped. See :func:`propose` for the steps and the NMS.

    The anchors are recomputed from the config (:func:`anchors_per_level`), so ``A`` must be
    ``len(fpn_anchors(input_size, strides, sizes, ratios))``.

    Args:
        input_size, strides, sizes, ratios: of :func:`fpn_anchors`.
        pre_nms_topk: candidates per level before NMS (detectron2's test value: 1000).
        count: proposals per image after NMS (K).
        nms_iou: IoU above which NMS suppresses, in (0, 1].
        min_size: in pixels; boxes whose clipped width or height is not larger are dropped.
        per_level_nms: NMS per level (detectron2) or across levels.

    Raises:
        ValueError: a bad config value (naming it), or (when built) inputs whose shapes do not fit
            the anchors.
    """

    def __init__(self, input_size: int, strides: Sequence[int] = FPN_STRIDES, sizes: Sequence[float] = FPN_SIZES,
                 ratios: Sequence[float] = FPN_RATIOS, pre_nms_topk: int = 1000, count: int = 1000,
                 nms_iou: float = 0.7, min_size: float = 0.0, per_level_nms: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.anchors = anchors_per_level(input_size, strides, sizes, ratios)
        self.input_size = int(input_size)
        self.strides = [int(v) for v in strides]
        self.sizes = [float(v) for v in sizes]
        self.ratios = [float(v) for v in ratios]
        self.pre_nms_topk = _int_config("Proposals pre_nms_topk", pre_nms_topk, 1)
        self.count = _int_config("Proposals count", count, 1)
        self.nms_iou = _float_config("Proposals nms_iou", nms_iou)
        if self.nms_iou > 1:
            raise ValueError(f"Proposals nms_iou {nms_iou!r}: must be in (0, 1]")
        self.min_size = _float_config("Proposals min_size", min_size, positive=False)
        if not isinstance(per_level_nms, (bool, np.bool_)):
            raise ValueError(f"Proposals per_level_nms {per_level_nms!r}: must be True or False")
        self.per_level_nms = bool(per_level_nms)

    @property
    def num_anchors(self) -> int:
        return sum(len(a) for a in self.anchors)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(f"layer {self.name}: inputs must be [rpn_logits, rpn_deltas]")
        logits, deltas = (tf.TensorShape(s) for s in input_shape)
        total = self.num_anchors
        if logits.rank != 2 or logits[1] != total or deltas.rank != 3 or deltas[1] != total or deltas[2] != 4:
            raise ValueError(f"layer {self.name}: inputs must be (N, {total}) logits and (N, {total}, 4) deltas for "
                             f"the anchors of input {self.input_size}, strides {self.strides}, "
                             f"{len(self.ratios)} ratios; got {logits} and {deltas}")
        super().build(input_shape)

    def call(self, inputs):
        logits, deltas = inputs
        boxes, _, _ = propose(logits, deltas, self.anchors, self.input_size, self.pre_nms_topk, self.count,
                              self.nms_iou, self.min_size, self.per_level_nms)
        return boxes

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([tf.TensorShape(input_shape[0])[0], self.count, 4])

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: no weights."""
        return []

    def get_config(self):
        return {**super().get_config(), "input_size": self.input_size, "strides": self.strides,
                "sizes": self.sizes, "ratios": self.ratios, "pre_nms_topk": self.pre_nms_topk,
                "count": self.count, "nms_iou": self.nms_iou, "min_size": self.min_size,
                "per_level_nms": self.per_level_nms}
