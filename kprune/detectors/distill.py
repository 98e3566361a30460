"""Distillation from a dense teacher's head outputs (the pruned student learns the teacher's
predictions besides the labels), for each detector family's output layout.

Every term is a divergence, zero when the student's outputs equal the teacher's:

- objectness and per-class sigmoids: Bernoulli KL, ``BCE(p_teacher, student) - BCE(p_teacher, teacher)``;
- softmax classes: KL(teacher || student), ``CE(teacher, student) - CE(teacher, teacher)``;
- boxes: squared error (YOLO: sigmoid centre offsets and raw log sizes) or smooth L1 (SSD's
  encoded offsets).

Background noise is not rewarded: the box and class terms of each YOLO anchor are weighted by the
teacher's objectness, those of each SSD prior by the teacher's foreground probability
(1 - p(background)), so where the teacher sees nothing only "there is nothing" is learned
(the objectness-scaled distillation of Mehta & Ozturk 2018). YOLO terms are summed over cells and
averaged over images, like :mod:`kprune.detectors.yolo.loss`; SSD's are divided by the teacher's
total foreground weight (at least 1), like the matched priors of the MultiBox loss. Each family's
``distillation(model)`` (:mod:`kprune.detectors.yolo.distill`, :mod:`kprune.detectors.ssd.distill`)
builds on the divergences here.
"""

from __future__ import annotations

from kprune._keras import tf


def bernoulli_kl(teacher_logits, student_logits):
    """KL of Bernoulli(sigmoid(student)) from Bernoulli(sigmoid(teacher)), elementwise."""
    p = tf.sigmoid(teacher_logits)
    bce = tf.nn.sigmoid_cross_entropy_with_logits
    return bce(labels=p, logits=student_logits) - bce(labels=p, logits=teacher_logits)


def softmax_kl(teacher_logits, student_logits):
    """KL(softmax(teacher) || softmax(student)) over the last axis."""
    p = tf.nn.softmax(teacher_logits)
    ce = tf.nn.softmax_cross_entropy_with_logits
    return ce(labels=p, logits=student_logits) - ce(labels=p, logits=teacher_logits)


def attention_map(features):
    """The spatial attention map of feature maps (N, H, W, C): the mean over channels of the squared
    activations, flattened to (N, H*W) and scaled to unit L2 norm (Zagoruyko & Komodakis 2017).
    It does not depend on the number of channels, so a pruned layer compares with its original."""
    energy = tf.reduce_mean(tf.square(tf.cast(features, tf.float32)), axis=-1)
    return tf.math.l2_normalize(tf.reshape(energy, [tf.shape(energy)[0], -1]), axis=-1)


def attention_imitation(student_features, teacher_features):
    """Feature imitation: the squared distance of the student's and the teacher's attention maps
    (:func:`attention_map`), summed over the given layers and averaged over the images; zero when
    the maps agree, at most 4 per layer (the maps are unit vectors)."""
    total = 0.0
    for s, t in zip(student_features, teacher_features):
        total += tf.reduce_mean(tf.reduce_sum(tf.square(attention_map(s) - tf.stop_gradient(attention_map(t))), -1))
    return total


def as_float_list(outputs) -> list:
    """A model's output(s) as a list of float32 tensors."""
    return [tf.cast(o, tf.float32) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
