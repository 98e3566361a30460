"""Distillation of an SSD model's output (see :mod:`kprune.detectors.distill`)."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from kprune._keras import tf
from kprune.detectors.distill import as_float_list, softmax_kl
from kprune.detectors.ssd.loss import smooth_l1


def ssd_distillation(model) -> Callable[[Sequence, Sequence], Dict[str, tf.Tensor]]:
    """``distill(student_outputs, teacher_outputs) -> {"distill": ...}`` for an SSD model's
    (N, priors, 4 + classes + 1) output, background at class 0."""

    def distill(student, teacher):
        (s,), (t,) = as_float_list(student), as_float_list(teacher)
        foreground = tf.stop_gradient(1.0 - tf.nn.softmax(t[..., 4:])[..., 0])
        boxes = tf.reduce_sum(smooth_l1(s[..., :4] - t[..., :4]), -1)
        kinds = softmax_kl(t[..., 4:], s[..., 4:])
        return {"distill": tf.reduce_sum(kinds + foreground * boxes) / tf.maximum(tf.reduce_sum(foreground), 1.0)}

    return distill
