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

from kprune._keras import tf
from kprune.models.layers import DetectionHead, detection_heads


def probabilities(new_coords: int):
    """The function from a head's raw entries to probabilities: the logistic, or (``new_coords``,
    where the head conv applied it already) the identity."""
    return (lambda v: v) if new_coords else tf.sigmoid


def cell_offset_and_size(x, scale_x_y: float = 1.0, new_coords: int = 0, max_log_size: Optional[float] = None):
    """The box centre's offset in its grid cell and the box size in anchors, from raw entries ``x``
    (..., >= 4: x, y, w, h first). ``max_log_size`` clips log-space sizes before ``exp`` (training:
    a wild prediction must not overflow)."""
    s = float(scale_x_y)
    offset = probabilities(new_coords)(x[..., 0:2]) * s - (s - 1) / 2
    if new_coords:
        return offset, tf.square(2 * x[..., 2:4])
    raw = x[..., 2:4] if max_log_size is None else tf.clip_by_value(x[..., 2:4], -max_log_size, max_log_size)
    return offset, tf.exp(raw)


def decode_head(output, head: DetectionHead, input_hw: Tuple[int, int]):
    """Boxes and class scores of one head.

    Args:
        output: raw head output, (N, H, W, A*(5+classes)).
        head: the head's metadata.
        input_hw: the network input (height, width) in pixels (used by yolo heads).

    Returns:
        ``boxes`` (N, H*W*A, 4) xyxy normalised to the input, and ``scores`` (N, H*W*A, classes).
    """
    output = tf.convert_to_tensor(output, tf.float32)
    grid_h, grid_w = output.shape[1], output.shape[2]
    anchors = tf.constant(head.head_anchors, tf.float32)  # (A, 2) as (w, h)
    x = tf.reshape(output, [-1, grid_h, grid_w, head.num_anchors, 5 + head.classes])
    cols, rows = tf.meshgrid(tf.range(grid_w, dtype=tf.float32), tf.range(grid_h, dtype=tf.float32))
    cell = tf.stack([cols, rows], axis=-1)[None, :, :, None, :]  # (1, H, W, 1, 2) as (x, y)
    grid = tf.constant([grid_w, grid_h], tf.float32)
    offset, size = cell_offset_and_size(x, head.scale_x_y, head.new_coords)
    centre = (cell + offset) / grid
    logistic = probabilities(head.new_coords)
    if head.kind == "region":
        size = size * anchors / grid
        classes = tf.nn.softmax(x[..., 5:], axis=-1)
    else:
        size = size * anchors / tf.constant([input_hw[1], input_hw[0]], tf.float32)
        classes = logistic(x[..., 5:])
    scores = logistic(x[..., 4:5]) * classes
    boxes = tf.concat([centre - size / 2, centre + size / 2], axis=-1)
    count = grid_h * grid_w * head.num_anchors
    return tf.reshape(boxes, [-1, count, 4]), tf.reshape(scores, [-1, count, head.classes])


def decode_outputs(model, outputs: Sequence):
    """Decode every head of ``model`` and concatenate: boxes (N, B, 4), scores (N, B, classes)."""
    heads = detection_heads(model)
    if len(outputs) != len(heads):
        raise ValueError(f"model {model.name!r} has {len(heads)} heads but {len(outputs)} outputs were given")
    input_hw = tuple(model.input_shape[1:3])
    decoded = [decode_head(o, h, input_hw) for o, h in zip(outputs, heads)]
    return tf.concat([d[0] for d in decoded], axis=1), tf.concat([d[1] for d in decoded], axis=1)


