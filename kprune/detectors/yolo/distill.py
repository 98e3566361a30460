"""Distillation of a YOLO model's head outputs (see :mod:`kprune.detectors.distill`)."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from kprune._keras import tf
from kprune.detectors.distill import as_float_list, bernoulli_kl, softmax_kl
from kprune.models.layers import detection_heads


def _as_logits(x, new_coords: int):
    """A head's entries with the centre offsets, objectness and classes as logits: those of a
    ``new_coords`` head are probabilities (its conv applied the logistic); sizes stay as output."""
    if not new_coords:
        return x
    p = tf.clip_by_value(x, 1e-7, 1.0 - 1e-7)
    logits = tf.math.log(p) - tf.math.log1p(-p)
    return tf.concat([logits[..., 0:2], x[..., 2:4], logits[..., 4:]], -1)


def yolo_distillation(model) -> Callable[[Sequence, Sequence], Dict[str, tf.Tensor]]:
    """``distill(student_outputs, teacher_outputs) -> {"distill": ...}`` for a YOLO model's heads
    (region: softmax classes; yolo: sigmoid classes; a ``new_coords`` head's probabilities taken as
    the logits they come from)."""
    heads = [(h.kind, h.num_anchors, h.classes, h.new_coords) for h in detection_heads(model)]

    def distill(student, teacher):
        total = 0.0
        for (kind, anchors, classes, new_coords), s, t in zip(heads, as_float_list(student), as_float_list(teacher)):
            shape = tf.concat([tf.shape(s)[:3], [anchors, 5 + classes]], 0)
            s, t = _as_logits(tf.reshape(s, shape), new_coords), _as_logits(tf.reshape(t, shape), new_coords)
            weight = tf.stop_gradient(tf.sigmoid(t[..., 4]))
            objects = bernoulli_kl(t[..., 4], s[..., 4])
            boxes = (tf.reduce_sum(tf.square(tf.sigmoid(s[..., 0:2]) - tf.sigmoid(t[..., 0:2])), -1)
                     + tf.reduce_sum(tf.square(s[..., 2:4] - t[..., 2:4]), -1))
            if kind == "region":
                kinds = softmax_kl(t[..., 5:], s[..., 5:])
            else:
                kinds = tf.reduce_sum(bernoulli_kl(t[..., 5:], s[..., 5:]), -1)
            images = tf.cast(tf.shape(s)[0], tf.float32)
            total += tf.reduce_sum(objects + weight * (boxes + kinds)) / images
        return {"distill": total}

    return distill
