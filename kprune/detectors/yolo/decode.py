"""Decoding of YOLO head outputs into boxes and class scores.

- region (YOLOv2): x = (col + sigmoid(tx)) / grid_w, w = anchor_w * exp(tw) / grid_w (anchors in
  grid cells); score = sigmoid(objectness) * softmax(class logits).
- yolo (YOLOv3): the same centres; w = anchor_w * exp(tw) / input_w (anchors in input pixels);
  score = sigmoid(objectness) * sigmoid(class logits).
- yolo heads of AlexeyAB's fork: with ``scale_x_y`` s, x = (sigmoid(tx) * s - (s - 1) / 2 + col) /
  grid_w; with ``new_coords=1`` the head conv has applied the logistic already (p = its output, no
  sigmoid here), x = (p_x * s - (s - 1) / 2 + col) / grid_w, w = (2 * p_w)^2 * anchor_w / input_w and
  score = p_objectness * p_class.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from kprune._keras import tf
from kprune.detectors.base import DetectionOpInputs
from kprune.models.layers import DetectionHead, detection_heads


def probabilities(new_coords: int):
    """The function from a head's raw entries to probabilities: the logistic, or (``new_coords``,
    where the head conv applied it already) the identity."""
    return (lambda v: v) if new_coords else tf.sigmoid


def cell_offset(x, scale_x_y: float = 1.0, new_coords: int = 0):
    """The box centre's offset in its grid cell (..., 2) from raw entries ``x`` (..., >= 2: x, y first)."""
    s = float(scale_x_y)
    return probabilities(new_coords)(x[..., 0:2]) * s - (s - 1) / 2


def cell_offset_and_size(x, scale_x_y: float = 1.0, new_coords: int = 0, max_log_size: Optional[float] = None):
    """The box centre's offset in its grid cell and the box size in anchors, from raw entries ``x``
    (..., >= 4: x, y, w, h first). ``max_log_size`` clips log-space sizes before ``exp`` (training:
    a wild prediction must not overflow)."""
    offset = cell_offset(x, scale_x_y, new_coords)
    if new_coords:
        return offset, tf.square(2 * x[..., 2:4])
    raw = x[..., 2:4] if max_log_size is None else tf.clip_by_value(x[..., 2:4], -max_log_size, max_log_size)
    return offset, tf.exp(raw)


def _head_geometry(output, head: DetectionHead, input_hw: Tuple[int, int]):
    """Box centres (N, H, W, A, 2) and natural logs of box sizes (N, H, W, A, 2), both (x, y) and
    normalised to the input, and class scores (N, H, W, A, classes) of one head. Sizes are kept in
    log space so that the detection post-processing op, which takes log sizes, gets them without an
    ``exp`` followed by a ``log``."""
    output = tf.convert_to_tensor(output, tf.float32)
    grid_h, grid_w = output.shape[1], output.shape[2]
    x = tf.reshape(output, [-1, grid_h, grid_w, head.num_anchors, 5 + head.classes])
    cols, rows = tf.meshgrid(tf.range(grid_w, dtype=tf.float32), tf.range(grid_h, dtype=tf.float32))
    cell = tf.stack([cols, rows], axis=-1)[None, :, :, None, :]  # (1, H, W, 1, 2) as (x, y)
    centre = (cell + cell_offset(x, head.scale_x_y, head.new_coords)) / tf.constant([grid_w, grid_h], tf.float32)
    # anchors (A, 2) as (w, h), in grid cells (region) or input pixels (yolo)
    units = [grid_w, grid_h] if head.kind == "region" else [input_hw[1], input_hw[0]]
    log_anchor = tf.math.log(tf.constant(head.head_anchors, tf.float32) / tf.constant(units, tf.float32))
    # new_coords: size = (2 p)^2 anchors; otherwise exp(t) anchors
    log_size = (2 * tf.math.log(2 * x[..., 2:4]) if head.new_coords else x[..., 2:4]) + log_anchor
    logistic = probabilities(head.new_coords)
    if head.kind == "region":
        classes = tf.nn.softmax(x[..., 5:], axis=-1)
    else:
        classes = logistic(x[..., 5:])
    return centre, log_size, logistic(x[..., 4:5]) * classes


def decode_head(output, head: DetectionHead, input_hw: Tuple[int, int]):
    """Boxes and class scores of one head.

    Args:
        output: raw head output, (N, H, W, A*(5+classes)).
        head: the head's metadata.
        input_hw: the network input (height, width) in pixels (used by yolo heads).

    Returns:
        ``boxes`` (N, H*W*A, 4) xyxy normalised to the input, and ``scores`` (N, H*W*A, classes).
    """
    centre, log_size, scores = _head_geometry(output, head, input_hw)
    size = tf.exp(log_size)
    boxes = tf.concat([centre - size / 2, centre + size / 2], axis=-1)
    count = int(centre.shape[1] * centre.shape[2] * head.num_anchors)
    return tf.reshape(boxes, [-1, count, 4]), tf.reshape(scores, [-1, count, head.classes])


def detection_op_inputs(model, outputs: Sequence):
    """Every head of ``model`` as the inputs of TFLite's detection post-processing op: the grid and
    anchor arithmetic done here, the op's own decoding made the identity (anchors (0, 0, 1, 1),
    scales 1: it then reads (y, x, log h, log w) of each box), scores without a background column.
    See :class:`~kprune.detectors.base.DetectionOpInputs`."""
    heads = _checked_heads(model, outputs)
    input_hw = tuple(model.input_shape[1:3])
    encodings, scores = [], []
    for output, head in zip(outputs, heads):
        centre, log_size, head_scores = _head_geometry(output, head, input_hw)
        count = int(centre.shape[1] * centre.shape[2] * head.num_anchors)
        yx_hw = tf.concat([centre[..., ::-1], log_size[..., ::-1]], axis=-1)  # (x, y) -> (y, x)
        encodings.append(tf.reshape(yx_hw, [-1, count, 4]))
        scores.append(tf.reshape(head_scores, [-1, count, head.classes]))
    encodings = tf.concat(encodings, axis=1)
    anchors = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (int(encodings.shape[1]), 1))
    return DetectionOpInputs(encodings, tf.concat(scores, axis=1), anchors)


def _checked_heads(model, outputs: Sequence) -> list:
    heads = detection_heads(model)
    if len(outputs) != len(heads):
        raise ValueError(f"model {model.name!r} has {len(heads)} heads but {len(outputs)} outputs were given")
    return heads


def decode_outputs(model, outputs: Sequence):
    """Decode every head of ``model`` and concatenate: boxes (N, B, 4), scores (N, B, classes)."""
    heads = _checked_heads(model, outputs)
    input_hw = tuple(model.input_shape[1:3])
    decoded = [decode_head(o, h, input_hw) for o, h in zip(outputs, heads)]
    return tf.concat([d[0] for d in decoded], axis=1), tf.concat([d[1] for d in decoded], axis=1)


