"""SSD's training targets (MultiBox matching), with TensorFlow ops inside the input pipeline.

Per image: every default box goes to the true box it overlaps most, and is positive if that IoU is
at least ``threshold`` (0.5); besides, every true box claims the default box it overlaps most (its
best match is positive whatever the IoU; when two true boxes claim the same default box, the later
one in the list wins). Positive boxes get the class label + 1 and the encoded offsets of their true
box (:func:`kprune.detectors.ssd.priors.encode`); the others label 0 (background), except those lying
at least ``ignore_overlap`` inside an ignore region (crowd, DontCare, difficult), which get -1 and
count neither as object nor as background.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from kprune._keras import tf
from kprune.detectors.ssd.priors import anchors_xyxy, encode


def _pairwise(anchors, boxes):
    """Intersections (B, P, N) of anchors (P, 4) with each image's boxes (B, N, 4), both xyxy, and the
    anchors' and boxes' areas."""
    a = [anchors[None, :, None, k] for k in range(4)]
    b = [boxes[:, None, :, k] for k in range(4)]
    inter_w = tf.maximum(tf.minimum(a[2], b[2]) - tf.maximum(a[0], b[0]), 0.0)
    inter_h = tf.maximum(tf.minimum(a[3], b[3]) - tf.maximum(a[1], b[1]), 0.0)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = tf.maximum(b[2] - b[0], 0.0) * tf.maximum(b[3] - b[1], 0.0)
    return inter_w * inter_h, area_a, area_b


class MultiBoxEncoder:
    """Targets of an SSD model: ``{key: {"labels": (B, P) int32, "boxes": (B, P, 4)}}``.

    Args:
        anchors: the default boxes (P, 4) as (y_center, x_center, height, width), normalised.
        variances: the box coder's variances.
        threshold: IoU from which a default box is matched to a true box.
        ignore_overlap: fraction of a default box inside an ignore region that makes it ignored.
        key: the name of the targets in the batch (the head layer's name).
    """

    def __init__(self, anchors: np.ndarray, variances: Sequence[float], threshold: float = 0.5,
                 ignore_overlap: float = 0.5, key: str = "multibox"):
        self.anchors = np.asarray(anchors, np.float32)
        self.variances = [float(v) for v in variances]
        self.threshold, self.ignore_overlap, self.key = float(threshold), float(ignore_overlap), key

    def __call__(self, boxes, labels, image_hw=None, ignore=None) -> Dict[str, Dict[str, tf.Tensor]]:
        boxes = tf.convert_to_tensor(boxes, tf.float32)
        labels = tf.convert_to_tensor(labels, tf.int32)
        anchors = tf.constant(self.anchors)
        corners = tf.constant(anchors_xyxy(self.anchors).astype(np.float32))
        count = len(self.anchors)
        batch, n = tf.shape(boxes)[0], tf.shape(boxes)[1]
        valid = (labels >= 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        inter, area_a, area_b = _pairwise(corners, boxes)
        iou = tf.where(valid[:, None, :], inter / tf.maximum(area_a + area_b - inter, 1e-12), -1.0)
        padded = tf.concat([iou, tf.fill([batch, count, 1], -1.0)], axis=2)  # images without boxes
        best_box = tf.argmax(padded, axis=2, output_type=tf.int32)  # (B, P)
        best_iou = tf.reduce_max(padded, axis=2)
        best_anchor = tf.argmax(iou, axis=1, output_type=tf.int32)  # (B, N)
        image = tf.repeat(tf.range(batch)[:, None], n, axis=1)
        segment = tf.where(valid, image * count + best_anchor, batch * count)
        box_index = tf.broadcast_to(tf.range(n)[None, :], tf.shape(labels))
        claimed = tf.math.unsorted_segment_max(tf.reshape(box_index, [-1]), tf.reshape(segment, [-1]),
                                               batch * count + 1)[:batch * count]
        claimed = tf.reshape(claimed, [batch, count])  # an empty segment holds the smallest int32
        matched = tf.where(claimed >= 0, claimed, best_box)
        positive = (claimed >= 0) | (best_iou >= self.threshold)
        safe = tf.minimum(matched, tf.maximum(n - 1, 0))
        true_boxes = tf.gather(boxes, safe, batch_dims=1)
        true_labels = tf.gather(labels, safe, batch_dims=1)
        classes = tf.where(positive, true_labels + 1, 0)
        if ignore is not None:
            ignore = tf.convert_to_tensor(ignore, tf.float32)
            inside, area, region_area = _pairwise(corners, ignore)
            inside = tf.where(region_area > 0, inside / tf.maximum(area, 1e-12), 0.0)
            inside = tf.reduce_max(tf.concat([inside, tf.zeros([batch, count, 1])], axis=2), axis=2)
            classes = tf.where(~positive & (inside >= self.ignore_overlap), -1, classes)
        offsets = encode(true_boxes, anchors, self.variances) * tf.cast(positive, tf.float32)[..., None]
        return {self.key: {"labels": classes, "boxes": offsets}}
