"""Decoding of YOLO head outputs into boxes and class scores.

- region (YOLOv2): x = (col + sigmoid(tx)) / grid_w, w = anchor_w * exp(tw) / grid_w (anchors in
  grid cells); score = sigmoid(objectness) * softmax(class logits).
- yolo (YOLOv3): the same centres; w = anchor_w * exp(tw) / input_w (anchors in input pixels);
  score = sigmoid(objectness) * sigmoid(class logits).
"""

from __future__ import annotations

from typing import Sequence, Tuple

from kprune._keras import tf
from kprune.models.layers import DetectionHead, detection_heads


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
    centre = (cell + tf.sigmoid(x[..., 0:2])) / grid
    if head.kind == "region":
        size = tf.exp(x[..., 2:4]) * anchors / grid
        classes = tf.nn.softmax(x[..., 5:], axis=-1)
    else:
        size = tf.exp(x[..., 2:4]) * anchors / tf.constant([input_hw[1], input_hw[0]], tf.float32)
        classes = tf.sigmoid(x[..., 5:])
    scores = tf.sigmoid(x[..., 4:5]) * classes
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


