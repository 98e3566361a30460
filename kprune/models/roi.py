"""Geometry and layers of a Faster R-CNN with FPN (the detectron2 / torchvision recipe).

Coordinates are normalised to the square input (0 .. 1 across ``input_size`` pixels) and boxes are
``xyxy`` (x_min, y_min, x_max, y_max), unless a docstring says otherwise.

- :func:`level_sizes`, :func:`anchors_per_level`, :func:`fpn_anchors`: the FPN levels' feature-map
  sides and the RPN's anchors, one size per level, in the order of the RPN head's flattened outputs.
- :func:`encode`, :func:`decode`: detectron2's ``Box2BoxTransform`` (deltas dx, dy, dw, dh with
  weights; (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the ROI heads).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from kprune._keras import tf

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
