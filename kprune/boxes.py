"""Box formats, conversions and IoU (continuous coordinates: area = w * h, no "+1" pixel).

Formats: ``xyxy`` (x_min, y_min, x_max, y_max), ``xywh`` (COCO: x_min, y_min, width, height) and
``cxcywh`` (centre and size, as YOLO predicts them).
"""

from __future__ import annotations

import numpy as np


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    half = boxes[..., 2:4] / 2
    return np.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., 2:4] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:4]], axis=-1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), both xyxy; returns (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


IOU_KINDS = ("iou", "giou", "diou", "ciou")


def paired_ious(a, b) -> dict:
    """IoU and its generalisations for pairs of xyxy boxes ``a`` and ``b`` (..., 4), broadcast, as
    differentiable TensorFlow ops (for box losses; numpy inputs work too):

    - ``iou`` = I / U;
    - ``giou`` = IoU - (C - U) / C, C the area of the smallest box enclosing both (Rezatofighi et al.);
    - ``diou`` = IoU - d^2 / c^2, d the distance of the centres, c the diagonal of that enclosing box;
    - ``ciou`` = DIoU - alpha v, v = 4 / pi^2 (atan(w_b / h_b) - atan(w_a / h_a))^2 and
      alpha = v / (1 - IoU + v), alpha held constant for the gradient (Zheng et al. 2020).

    Returns:
        dict of the four, keyed by :data:`IOU_KINDS`, each of shape ``...``.
    """
    from kprune._keras import tf  # TensorFlow only where a loss needs it: evaluation reads boxes without it

    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    eps = 1e-9
    wh_a = tf.maximum(a[..., 2:4] - a[..., 0:2], 0.0)
    wh_b = tf.maximum(b[..., 2:4] - b[..., 0:2], 0.0)
    inter = tf.reduce_prod(tf.maximum(tf.minimum(a[..., 2:4], b[..., 2:4]) - tf.maximum(a[..., 0:2], b[..., 0:2]), 0.0), -1)
    union = tf.reduce_prod(wh_a, -1) + tf.reduce_prod(wh_b, -1) - inter
    iou = inter / tf.maximum(union, eps)
    enclosing = tf.maximum(a[..., 2:4], b[..., 2:4]) - tf.minimum(a[..., 0:2], b[..., 0:2])
    area_c = tf.reduce_prod(enclosing, -1)
    giou = iou - (area_c - union) / tf.maximum(area_c, eps)
    centres = (a[..., 0:2] + a[..., 2:4] - b[..., 0:2] - b[..., 2:4]) / 2
    diou = iou - tf.reduce_sum(tf.square(centres), -1) / tf.maximum(tf.reduce_sum(tf.square(enclosing), -1), eps)
    v = (4 / np.pi ** 2) * tf.square(tf.atan(wh_b[..., 0] / tf.maximum(wh_b[..., 1], eps))
                                     - tf.atan(wh_a[..., 0] / tf.maximum(wh_a[..., 1], eps)))
    alpha = tf.stop_gradient(v / tf.maximum(1 - iou + v, eps))
    return {"iou": iou, "giou": giou, "diou": diou, "ciou": diou - alpha * v}
