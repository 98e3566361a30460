"""SSD's default boxes (priors) and box coder.

Default boxes of one feature map of H x W cells, per cell (row i, column j) in this order: a square
box of side ``min_size``, a square of side sqrt(min_size * max_size) (when there is a max size), then
for every aspect ratio r the boxes (min_size * sqrt(r), min_size / sqrt(r)) and
(min_size / sqrt(r), min_size * sqrt(r)); all centred at ((j + offset) * step, (i + offset) * step)
with sizes and steps as fractions of the input side, and never clipped (the original Caffe
PriorBox with flip=true, clip=false).

Coding with variances (v_c, v_s): ty = (y - y_p) / (h_p v_c), tx = (x - x_p) / (w_p v_c),
th = log(h / h_p) / v_s, tw = log(w / w_p) / v_s, in the order (ty, tx, th, tw) of the model's box
outputs and of TFLite's detection post-processing op.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

from kprune._keras import tf


def level_shapes(spec: dict) -> List[Tuple[float, float]]:
    """The (height, width) of the default boxes at one location of a feature map, in output order."""
    size = spec["min_size"]
    shapes = [(size, size)]
    if spec["max_size"] is not None:
        side = math.sqrt(size * spec["max_size"])
        shapes.append((side, side))
    for ratio in spec["aspect_ratios"]:
        root = math.sqrt(ratio)
        shapes += [(size / root, size * root), (size * root, size / root)]  # (h, w): r, then 1/r
    return shapes


def level_priors(spec: dict, feature_hw: Tuple[int, int]) -> np.ndarray:
    """Default boxes of one feature map as (y_center, x_center, height, width), float64 (H*W*A, 4)."""
    height, width = feature_hw
    step_y = spec["step"] if spec["step"] is not None else 1.0 / height
    step_x = spec["step"] if spec["step"] is not None else 1.0 / width
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    centres = np.stack([(rows + spec["offset"]) * step_y, (cols + spec["offset"]) * step_x], -1).reshape(-1, 1, 2)
    hw = np.asarray(level_shapes(spec), np.float64)[None]
    return np.concatenate(np.broadcast_arrays(centres, hw), axis=-1).reshape(-1, 4)


def priors(specs: Sequence[dict], feature_sizes: Sequence[Tuple[int, int]]) -> np.ndarray:
    """The default boxes of every feature map, in output order: (P, 4) as (yc, xc, h, w)."""
    return np.concatenate([level_priors(s, f) for s, f in zip(specs, feature_sizes)]).astype(np.float32)


def encode(boxes_xyxy, anchors, variances: Sequence[float]):
    """Normalised xyxy boxes (..., 4) -> offsets (ty, tx, th, tw) against anchors (..., 4) (yc, xc, h, w)."""
    centre_x = (boxes_xyxy[..., 0] + boxes_xyxy[..., 2]) / 2
    centre_y = (boxes_xyxy[..., 1] + boxes_xyxy[..., 3]) / 2
    w = tf.maximum(boxes_xyxy[..., 2] - boxes_xyxy[..., 0], 1e-8)
    h = tf.maximum(boxes_xyxy[..., 3] - boxes_xyxy[..., 1], 1e-8)
    return tf.stack([(centre_y - anchors[..., 0]) / (anchors[..., 2] * variances[0]),
                     (centre_x - anchors[..., 1]) / (anchors[..., 3] * variances[0]),
                     tf.math.log(h / anchors[..., 2]) / variances[1],
                     tf.math.log(w / anchors[..., 3]) / variances[1]], axis=-1)


def decode(offsets, anchors, variances: Sequence[float], max_log: float = 8.0):
    """Offsets (..., 4) (ty, tx, th, tw) -> normalised xyxy boxes; log sizes clipped to ``max_log``."""
    centre_y = anchors[..., 0] + offsets[..., 0] * variances[0] * anchors[..., 2]
    centre_x = anchors[..., 1] + offsets[..., 1] * variances[0] * anchors[..., 3]
    h = anchors[..., 2] * tf.exp(tf.minimum(offsets[..., 2] * variances[1], max_log))
    w = anchors[..., 3] * tf.exp(tf.minimum(offsets[..., 3] * variances[1], max_log))
    return tf.stack([centre_x - w / 2, centre_y - h / 2, centre_x + w / 2, centre_y + h / 2], axis=-1)


def anchors_xyxy(anchors: np.ndarray) -> np.ndarray:
    """(yc, xc, h, w) -> (x_min, y_min, x_max, y_max)."""
    yc, xc, h, w = np.moveaxis(np.asarray(anchors), -1, 0)
    return np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=-1)
