"""Faster R-CNN's two-stage loss (the detectron2 recipe) over the targets of
:class:`~kprune.detectors.rcnn.targets.RPNEncoder` and the model's five outputs
``[rpn_logits (B, A), rpn_deltas (B, A, 4), proposals (B, K, 4), class_logits (B, K, C + 1),
box_deltas (B, K, C, 4)]``::

    loss = rpn_class + rpn_box_weight * rpn_box + roi_class + roi_box_weight * roi_box

RPN (the anchors the encoder sampled): ``rpn_class`` the binary cross-entropy of the objectness
logits over the sampled anchors, ``rpn_box`` the L1 (smooth L1 with ``smooth_l1_beta`` > 0) distance
of the predicted deltas to the encoded ones over the positive anchors, both divided by the number of
anchors sampled in the batch. detectron2 divides by B x ``rpn_per_image`` instead; the two agree
whenever every image has ``rpn_per_image`` anchors to sample (any real image at the recipe's sizes:
tens of thousands of anchors, nearly all negative), and differ only when ignore regions or a tiny
anchor set leave fewer.

ROI heads: each proposal (gradient stopped; all-zero padding rows are never sampled) is matched to
the true box it overlaps most, foreground if that IoU is at least ``roi_foreground_iou``, background
otherwise (background proposals at least ``ignore_overlap`` inside an ignore region are not
sampled); each image then keeps at random up to ``roi_per_image`` proposals, at most
``roi_positive_fraction`` of them foreground. ``roi_class`` is the softmax cross-entropy over the
sampled proposals (label 0 background, class + 1 foreground); ``roi_box`` the L1 / smooth-L1
distance of the true class's predicted deltas to ``encode(true box, proposal, box_weights)`` over
the sampled foreground; both divided by the number of proposals sampled in the batch (as detectron2
does). Terms are averages over the batch's images, so the trainer's division by the replica count
gives the global average.

Unlike detectron2, the ground-truth boxes are not appended to the proposals: the proposals come out
of the model, which holds a fixed number of them. Early in training, before the RPN has learned to
propose objects, few proposals (often none) reach ``roi_foreground_iou``, so the ROI heads first see
mostly background and ``roi_box`` is small or zero; the classifier learns the objects as the RPN
improves. (detectron2's appended boxes give every image foreground from the first step.)

The sampling is random, in the graph, with a stateless seed from a fingerprint of the batch's
proposals and true boxes: it works under ``tf.function`` and ``tf.distribute`` (each replica draws
from its own proposals) and a deterministic training run stays deterministic.

The RPN settings (``rpn_*``) and ``ignore_overlap`` are read by the encoder
(:meth:`~kprune.detectors.rcnn.targets.RPNEncoder.from_options`), the rest by :class:`RCNNLoss`.
``box_weights`` must be the weights the model decodes its box deltas with.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from kprune._keras import tf
from kprune.config import Float, Int, schema
from kprune.detectors.rcnn.targets import best_match, batch_seed, inside_ignore, iou_with_truth, sample, valid_boxes
from kprune.models.roi import ROI_BOX_WEIGHTS, encode


@schema(frozen=True)
class RCNNLossOptions:
    """Matching, sampling and loss settings (detectron2's defaults for Faster R-CNN FPN).

    Attributes:
        rpn_positive_iou, rpn_negative_iou: an anchor is positive from this IoU, negative below that.
        rpn_per_image, rpn_positive_fraction: anchors sampled per image, their largest positive share.
        rpn_box_weight, roi_box_weight: weights of the box terms in ``loss``.
        roi_per_image, roi_positive_fraction: proposals sampled per image, their largest foreground share.
        roi_foreground_iou: a proposal is foreground from this IoU with a true box.
        smooth_l1_beta: 0 for L1 (detectron2's default), > 0 for smooth L1 with this beta (both stages).
        ignore_overlap: fraction of an anchor or a background proposal inside an ignore region that
            keeps it out of the sample.
        box_weights: the ROI heads' box coder weights (wx, wy, ww, wh).
    """

    rpn_positive_iou: Float = 0.7
    rpn_negative_iou: Float = 0.3
    rpn_per_image: Int = 256
    rpn_positive_fraction: Float = 0.5
    rpn_box_weight: Float = 1.0
    roi_box_weight: Float = 1.0
    roi_per_image: Int = 512
    roi_positive_fraction: Float = 0.25
    roi_foreground_iou: Float = 0.5
    smooth_l1_beta: Float = 0.0
    ignore_overlap: Float = 0.5
    box_weights: Tuple[Float, Float, Float, Float] = ROI_BOX_WEIGHTS

    def __post_init__(self):
        for name in ("rpn_positive_iou", "rpn_negative_iou", "rpn_positive_fraction", "roi_positive_fraction",
                     "roi_foreground_iou", "ignore_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"loss option {name} = {getattr(self, name)}: must be in [0, 1]")
        if self.rpn_negative_iou > self.rpn_positive_iou:
            raise ValueError(f"loss option rpn_negative_iou = {self.rpn_negative_iou}: must be <= rpn_positive_iou "
                             f"({self.rpn_positive_iou})")
        for name in ("rpn_per_image", "roi_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"loss option {name} = {getattr(self, name)}: must be >= 1")
        for name in ("rpn_box_weight", "roi_box_weight", "smooth_l1_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss option {name} = {getattr(self, name)}: must be >= 0")
        if any(not w > 0 for w in self.box_weights):
            raise ValueError(f"loss option box_weights = {list(self.box_weights)}: must be four numbers > 0")


def box_distance(difference, beta: float):
    """Elementwise L1 (``beta`` 0) or smooth L1 (detectron2's: ``0.5 x^2 / beta`` below ``beta``,
    ``|x| - 0.5 beta`` above)."""
    absolute = tf.abs(difference)
    if beta <= 0.0:
        return absolute
    return tf.where(absolute < beta, 0.5 * tf.square(difference) / beta, absolute - 0.5 * beta)


class RCNNLoss:
    """Call with the pipeline's targets and the model's five outputs; returns the scalar terms
    :attr:`terms` (``rpn_box`` and ``roi_box`` with their weights applied, so ``loss`` is the sum).

    Args:
        options: the settings (default :class:`RCNNLossOptions`).
        key: the name of the targets in the batch (the head layer's name).
        classes: the number of object classes C (without background), to check the outputs' shapes.

    Raises:
        ValueError: (when called) not five outputs, or class outputs that do not have C + 1 logits
            and C x 4 deltas.
    """

    terms = ("rpn_class", "rpn_box", "roi_class", "roi_box", "loss")

    def __init__(self, options: Optional[RCNNLossOptions] = None, key: str = "rcnn", classes: Optional[int] = None):
        self.options, self.key = options or RCNNLossOptions(), key
        if classes is not None and (int(classes) != classes or classes < 1):
            raise ValueError(f"classes = {classes}: must be a whole number >= 1")
        self.classes = None if classes is None else int(classes)

    def _check(self, outputs):
        if not isinstance(outputs, (list, tuple)) or len(outputs) != 5:
            count = len(outputs) if isinstance(outputs, (list, tuple)) else 1
            raise ValueError(f"{count} output(s) for a Faster R-CNN loss, which takes five: rpn_logits, rpn_deltas, "
                             "proposals, class_logits, box_deltas")
        class_logits, box_deltas = outputs[3], outputs[4]
        classes = self.classes if self.classes is not None else box_deltas.shape[2]
        if classes is not None and (class_logits.shape[-1] not in (None, classes + 1)
                                    or box_deltas.shape[2] not in (None, classes)):
            raise ValueError(f"class_logits {class_logits.shape} and box_deltas {box_deltas.shape}: a model of "
                             f"{classes} classes gives (B, K, {classes + 1}) and (B, K, {classes}, 4)")

    def __call__(self, targets: Dict, outputs) -> Dict[str, tf.Tensor]:
        self._check(outputs)
        rpn_logits, rpn_deltas, proposals, class_logits, box_deltas = (tf.cast(o, tf.float32) for o in outputs)
        target = targets[self.key]
        rpn_class, rpn_box = self._rpn(target, rpn_logits, rpn_deltas)
        roi_class, roi_box = self._roi(target, tf.stop_gradient(proposals), class_logits, box_deltas)
        rpn_box = self.options.rpn_box_weight * rpn_box
        roi_box = self.options.roi_box_weight * roi_box
        return {"rpn_class": rpn_class, "rpn_box": rpn_box, "roi_class": roi_class, "roi_box": roi_box,
                "loss": rpn_class + rpn_box + roi_class + roi_box}

    def _rpn(self, target, logits, deltas):
        labels = tf.cast(target["rpn_labels"], tf.int32)
        sampled = labels >= 0
        count = tf.maximum(tf.reduce_sum(tf.cast(sampled, tf.float32)), 1.0)
        entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels > 0, tf.float32), logits=logits)
        located = tf.reduce_sum(box_distance(deltas - tf.cast(target["rpn_deltas"], tf.float32),
                                             self.options.smooth_l1_beta), axis=-1)
        return (tf.reduce_sum(tf.where(sampled, entropy, 0.0)) / count,
                tf.reduce_sum(tf.where(labels > 0, located, 0.0)) / count)

    def _roi(self, target, proposals, class_logits, box_deltas):
        o = self.options
        boxes = tf.cast(target["boxes"], tf.float32)
        labels = tf.cast(target["labels"], tf.int32)
        ignore = tf.cast(target["ignore"], tf.float32)
        real = (proposals[..., 2] > proposals[..., 0]) & (proposals[..., 3] > proposals[..., 1])  # not padding
        matched, best_iou = best_match(iou_with_truth(proposals, boxes, valid_boxes(boxes, labels)))
        foreground = real & (best_iou >= o.roi_foreground_iou)
        background = real & ~foreground & (inside_ignore(proposals, ignore) < o.ignore_overlap)
        foreground, background = sample(foreground, background, o.roi_per_image, o.roi_positive_fraction,
                                        batch_seed(0, proposals, boxes))
        sampled = foreground | background
        count = tf.maximum(tf.reduce_sum(tf.cast(sampled, tf.float32)), 1.0)
        true_class = tf.gather(labels, matched, batch_dims=1)  # (B, K)
        classes = tf.where(foreground, true_class + 1, 0)
        entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=classes, logits=class_logits)
        # the predicted deltas of the true class; background rows read class 0 and are masked out
        predicted = tf.gather(box_deltas, tf.where(foreground, true_class, 0), batch_dims=2)  # (B, K, 4)
        truth = tf.where(foreground[..., None], tf.gather(boxes, matched, batch_dims=1), proposals)
        wanted = tf.where(foreground[..., None], encode(truth, proposals, o.box_weights), 0.0)
        located = tf.reduce_sum(box_distance(predicted - wanted, o.smooth_l1_beta), axis=-1)
        return (tf.reduce_sum(tf.where(sampled, entropy, 0.0)) / count,
                tf.reduce_sum(tf.where(foreground, located, 0.0)) / count)
