"""SSD's MultiBox loss (Liu et al. 2016), over the targets of :mod:`kprune.detectors.ssd.targets`::

    (localization_weight * sum over positive boxes of smooth-L1(offsets - targets)
     + sum over positive and hard-negative boxes of softmax cross-entropy) / matched boxes

Hard negatives: per image, the ``neg_pos_ratio`` x (its positive count) background boxes with the
highest cross-entropy (the background boxes the model gets most wrong); ignored boxes (label -1) are
never among them. The division is by the positives of the whole batch (at least 1), as Caffe's
MultiBoxLoss normalises.
"""

from __future__ import annotations

from typing import Dict

from kprune._keras import tf
from kprune.config import Float, schema


@schema(frozen=True)
class MultiBoxOptions:
    """Matching and loss settings (SSD's own defaults)."""

    threshold: Float = 0.5
    neg_pos_ratio: Float = 3.0
    localization_weight: Float = 1.0
    ignore_overlap: Float = 0.5

    def __post_init__(self):
        for name in ("threshold", "ignore_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"loss option {name} = {getattr(self, name)}: must be in [0, 1]")
        for name in ("neg_pos_ratio", "localization_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss option {name} = {getattr(self, name)}: must be >= 0")


def smooth_l1(difference):
    absolute = tf.abs(difference)
    return tf.where(absolute < 1.0, 0.5 * tf.square(difference), absolute - 0.5)


class MultiBoxLoss:
    """Call with the pipeline's targets and the model's output (N, P, 4 + classes + 1)."""

    terms = ("localization", "confidence", "loss")

    def __init__(self, options: MultiBoxOptions = MultiBoxOptions(), key: str = "multibox"):
        self.options, self.key = options, key

    def __call__(self, targets: Dict, outputs) -> Dict[str, tf.Tensor]:
        if isinstance(outputs, (list, tuple)):
            if len(outputs) != 1:
                raise ValueError(f"{len(outputs)} outputs for an SSD loss, which takes one")
            outputs = outputs[0]
        output = tf.cast(outputs, tf.float32)
        labels = targets[self.key]["labels"]
        positive = labels > 0
        negative = tf.equal(labels, 0)
        positives = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)
        located = tf.reduce_sum(smooth_l1(output[..., :4] - targets[self.key]["boxes"]), axis=-1)
        entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(labels, 0), logits=output[..., 4:])
        background = tf.where(negative, tf.stop_gradient(entropy), -1.0)
        order = tf.argsort(background, axis=1, direction="DESCENDING", stable=True)
        rank = tf.argsort(order, axis=1, stable=True)
        quota = tf.minimum(self.options.neg_pos_ratio * positives,
                           tf.reduce_sum(tf.cast(negative, tf.float32), axis=1))
        hard = negative & (tf.cast(rank, tf.float32) < quota[:, None])
        matched = tf.maximum(tf.reduce_sum(positives), 1.0)
        localization = self.options.localization_weight * tf.reduce_sum(
            tf.where(positive, located, 0.0)) / matched
        confidence = tf.reduce_sum(tf.where(positive | hard, entropy, 0.0)) / matched
        return {"localization": localization, "confidence": confidence, "loss": localization + confidence}
