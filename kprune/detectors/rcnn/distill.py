"""Distillation of a Faster R-CNN model's five outputs (see :mod:`kprune.detectors.distill`).

The RPN's outputs belong to fixed anchors, the same in student and teacher: per anchor the
Bernoulli KL of the objectness plus the smooth-L1 distance of the deltas weighted by the teacher's
objectness, divided by the teacher's total objectness (at least 1), like SSD's foreground weighting.

The ROI heads' outputs belong to each model's own proposals, which differ once the student's RPN
differs: proposal k of the student is compared with proposal k of the teacher only where the two
boxes overlap by IoU >= :data:`SAME_PROPOSAL` (both non-empty). There the class term is
KL(teacher || student) over the softmax classes, and the box term the smooth-L1 distance of the
deltas of every class weighted by the teacher's probability of that class; the sum is divided by the
number of compared proposals (at least 1). All terms are zero when the outputs are equal.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from kprune._keras import tf
from kprune.detectors.distill import as_float_list, bernoulli_kl, softmax_kl
from kprune.detectors.rcnn.loss import box_distance

#: the IoU from which the student's and the teacher's k-th proposals count as the same box
SAME_PROPOSAL = 0.9


def _pairwise_iou(a, b):
    """IoU of a[..., k] with b[..., k] (xyxy); 0 for empty boxes."""
    width = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    height = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = width * height

    def area(x):
        return tf.maximum(x[..., 2] - x[..., 0], 0.0) * tf.maximum(x[..., 3] - x[..., 1], 0.0)

    union = area(a) + area(b) - inter
    return tf.where(union > 0, inter / tf.maximum(union, 1e-12), 0.0)


def rcnn_distillation(model) -> Callable[[Sequence, Sequence], Dict[str, tf.Tensor]]:
    """``distill(student_outputs, teacher_outputs) -> {"distill": ...}`` for a Faster R-CNN model's
    outputs ``[rpn_logits, rpn_deltas, proposals, class_logits, box_deltas]``."""

    def distill(student, teacher):
        s_logits, s_deltas, s_boxes, s_classes, s_box_deltas = as_float_list(student)
        t_logits, t_deltas, t_boxes, t_classes, t_box_deltas = as_float_list(teacher)
        objectness = tf.stop_gradient(tf.sigmoid(t_logits))
        rpn_boxes = tf.reduce_sum(box_distance(s_deltas - t_deltas, 1.0), -1)
        rpn = tf.reduce_sum(bernoulli_kl(t_logits, s_logits) + objectness * rpn_boxes) / \
            tf.maximum(tf.reduce_sum(objectness), 1.0)
        same = tf.cast(_pairwise_iou(tf.stop_gradient(s_boxes), t_boxes) >= SAME_PROPOSAL, tf.float32)
        probabilities = tf.stop_gradient(tf.nn.softmax(t_classes)[..., 1:])
        roi_boxes = tf.reduce_sum(probabilities * tf.reduce_sum(box_distance(s_box_deltas - t_box_deltas, 1.0), -1),
                                  -1)
        roi = tf.reduce_sum(same * (softmax_kl(t_classes, s_classes) + roi_boxes)) / tf.maximum(tf.reduce_sum(same),
                                                                                                1.0)
        return {"distill": rpn + roi}

    return distill
