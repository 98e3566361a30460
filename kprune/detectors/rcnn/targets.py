"""Faster R-CNN's RPN training targets (the detectron2 / torchvision recipe), with TensorFlow ops
inside the input pipeline; and the matching and sampling helpers the ROI loss shares.

Per image, every anchor goes to the true box it overlaps most (IoU). It is positive (1) if that IoU
is at least ``positive`` (0.7), negative (0) below ``negative`` (0.3), and ignored (-1) in between.
Besides, every true box makes positive the anchor(s) it overlaps most, all those tied at its best
IoU (detectron2's ``allow_low_quality_matches``); such an anchor keeps its own best box for its
deltas, as detectron2's matcher does. An anchor that is not positive and lies at least
``ignore_overlap`` inside an ignore region (crowd, DontCare, difficult) is ignored. Then each image
keeps at random up to ``per_image`` anchors, at most ``positive_fraction`` of them positive and
negatives filling the rest; the others become -1. An image without boxes has only negatives.

Anchors are neither clipped to the image nor excluded for crossing its border (detectron2's default,
``MODEL.RPN.BOUNDARY_THRESH = -1``; the original Faster R-CNN dropped border-crossing anchors).

The sampling is random but reproducible: its stateless seed is the encoder's ``seed`` with a
fingerprint of the batch's boxes, labels and ignore regions. A seeded pipeline (whose augmentation
follows the config's seed) therefore gives the same targets on every run, different from batch to
batch; two batches with exactly the same boxes (e.g. without augmentation, or without boxes) get
the same draw.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from kprune._keras import tf
from kprune.models.roi import encode

#: the RPN's box coder weights (detectron2's ``MODEL.RPN.BBOX_REG_WEIGHTS``)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def _corners(boxes):
    return [boxes[..., k] for k in range(4)]


def overlaps(a, b):
    """Intersection areas of every box of ``a`` (..., P, 4) with every box of ``b`` (..., N, 4), both
    xyxy (leading dimensions broadcast): ``(intersections (..., P, N), areas of a (..., P, 1),
    areas of b (..., 1, N))``; degenerate boxes have area 0."""
    ax0, ay0, ax1, ay1 = (c[..., :, None] for c in _corners(a))
    bx0, by0, bx1, by1 = (c[..., None, :] for c in _corners(b))
    inter_w = tf.maximum(tf.minimum(ax1, bx1) - tf.maximum(ax0, bx0), 0.0)
    inter_h = tf.maximum(tf.minimum(ay1, by1) - tf.maximum(ay0, by0), 0.0)
    area_a = tf.maximum(ax1 - ax0, 0.0) * tf.maximum(ay1 - ay0, 0.0)
    area_b = tf.maximum(bx1 - bx0, 0.0) * tf.maximum(by1 - by0, 0.0)
    return inter_w * inter_h, area_a, area_b


def valid_boxes(boxes, labels):
    """(B, N) bool: true boxes that are not padding (label >= 0) and have a positive area."""
    return (labels >= 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def iou_with_truth(boxes, truth, valid):
    """IoU (B, P, N) of ``boxes`` ((P, 4) or (B, P, 4)) with each image's true boxes (B, N, 4);
    -1 for the columns of invalid true boxes (padding)."""
    inter, area_a, area_b = overlaps(boxes, truth)
    iou = inter / tf.maximum(area_a + area_b - inter, 1e-12)
    return tf.where(valid[:, None, :], iou, -1.0)


def best_match(iou):
    """Per row of ``iou`` (B, P, N): (the index of the best column (B, P) int32, its IoU (B, P)); with
    no columns (N = 0) index 0 and IoU -1."""
    shape = tf.shape(iou)
    padded = tf.concat([iou, tf.fill([shape[0], shape[1], 1], -1.0)], axis=2)
    index = tf.argmax(padded, axis=2, output_type=tf.int32)
    return tf.minimum(index, tf.maximum(shape[2] - 1, 0)), tf.reduce_max(padded, axis=2)


def inside_ignore(boxes, ignore):
    """(B, P): the largest fraction of each box's area ((P, 4) or (B, P, 4)) inside one of the image's
    ignore regions (B, M, 4); zero-area regions are padding."""
    inter, area, region_area = overlaps(boxes, ignore)
    inside = tf.where(region_area > 0, inter / tf.maximum(area, 1e-12), 0.0)
    inside = tf.broadcast_to(inside, tf.shape(inter))
    shape = tf.shape(inside)
    return tf.reduce_max(tf.concat([inside, tf.zeros([shape[0], shape[1], 1])], axis=2), axis=2)


def batch_seed(seed: int, *tensors):
    """A stateless seed (2,) int64 from ``seed`` and a fingerprint of the values of ``tensors``."""
    flat = tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors], axis=0)
    digest = tf.fingerprint(flat[None, :])[0]  # (8,) uint8
    return tf.stack([tf.constant(int(seed), tf.int64), tf.bitcast(digest, tf.int64)])


def _pick(candidates, noise, quota, most: int):
    """(B, P) bool: in each image the ``quota`` (B,) candidates with the highest noise (at most ``most``)."""
    shape = tf.shape(candidates)
    k = tf.minimum(most, shape[1])
    _, index = tf.math.top_k(tf.where(candidates, noise, -1.0), k)  # ties: the lower index first
    chosen = tf.cast(tf.range(k)[None, :] < quota[:, None], tf.int32)
    image = tf.broadcast_to(tf.range(shape[0])[:, None], tf.shape(index))
    return tf.scatter_nd(tf.stack([image, index], axis=-1), chosen, shape) > 0


def sample(positive, negative, per_image: int, positive_fraction: float, seed):
    """Random per-image sampling (detectron2's ``subsample_labels``): up to ``per_image`` of each
    image's candidates, at most ``int(per_image * positive_fraction)`` of them positive, negatives
    filling the rest.

    Args:
        positive, negative: (B, P) bool, disjoint candidates.
        per_image, positive_fraction: the sample size and its positive share.
        seed: a stateless seed (2,) int64 (:func:`batch_seed`).

    Returns:
        (sampled positives, sampled negatives), both (B, P) bool.
    """
    most_positive = int(per_image * positive_fraction)
    noise = tf.random.stateless_uniform(tf.shape(positive), seed)  # in [0, 1): above the -1 of non-candidates
    positives = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), most_positive)
    negatives = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=1), per_image - positives)
    return (_pick(positive, noise, positives, most_positive), _pick(negative, noise, negatives, per_image))


class RPNEncoder:
    """Targets of the RPN: ``{key: {"rpn_labels", "rpn_deltas", "boxes", "labels", "ignore"}}``.

    ``rpn_labels`` (B, A) int32: 1 sampled positive, 0 sampled negative, -1 not sampled or ignored;
    ``rpn_deltas`` (B, A, 4) float32: the deltas (:func:`kprune.models.roi.encode`, weights 1) of
    the true box matched to each positive anchor, zero elsewhere; ``boxes`` (B, N, 4), ``labels``
    (B, N) int32 and ``ignore`` (B, M, 4) the ground truth, passed through for the ROI loss
    (``ignore`` zeros (B, 1, 4) when there is none).

    Args:
        anchors: (A, 4) normalised xyxy, in the order of the model's RPN outputs
            (:func:`kprune.models.roi.fpn_anchors`).
        positive, negative: IoU from which an anchor is positive, below which it is negative.
        per_image, positive_fraction: anchors sampled per image and the largest positive share.
        ignore_overlap: fraction of an anchor inside an ignore region that makes it ignored.
        key: the name of the targets in the batch (the head layer's name).
        seed: the sampling seed (mixed with a fingerprint of each batch).

    Raises:
        ValueError: anchors not of shape (A, 4), or a threshold, count or fraction out of range.
    """

    def __init__(self, anchors: np.ndarray, positive: float = 0.7, negative: float = 0.3, per_image: int = 256,
                 positive_fraction: float = 0.5, ignore_overlap: float = 0.5, key: str = "rcnn", seed: int = 0):
        self.anchors = np.asarray(anchors, np.float32)
        if self.anchors.ndim != 2 or self.anchors.shape[1] != 4 or not len(self.anchors):
            raise ValueError(f"anchors of shape {self.anchors.shape}: expected (A, 4) with A >= 1")
        for name, value in (("positive", positive), ("negative", negative), ("positive_fraction", positive_fraction),
                            ("ignore_overlap", ignore_overlap)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RPN {name} = {value}: must be in [0, 1]")
        if negative > positive:
            raise ValueError(f"RPN negative IoU {negative} above the positive IoU {positive}: must be <= it")
        if int(per_image) != per_image or per_image < 1:
            raise ValueError(f"RPN per_image = {per_image}: must be a whole number >= 1")
        self.positive, self.negative = float(positive), float(negative)
        self.per_image, self.positive_fraction = int(per_image), float(positive_fraction)
        self.ignore_overlap, self.key, self.seed = float(ignore_overlap), key, int(seed)

    @classmethod
    def from_options(cls, anchors: np.ndarray, options, key: str = "rcnn", seed: int = 0) -> "RPNEncoder":
        """The encoder of the RPN settings of ``options``
        (:class:`~kprune.detectors.rcnn.loss.RCNNLossOptions`)."""
        return cls(anchors, options.rpn_positive_iou, options.rpn_negative_iou, options.rpn_per_image,
                   options.rpn_positive_fraction, options.ignore_overlap, key=key, seed=seed)

    def __call__(self, boxes, labels, image_hw=None, ignore=None) -> Dict[str, Dict[str, tf.Tensor]]:
        """Targets of one batch: ``boxes`` (B, N, 4) normalised xyxy, ``labels`` (B, N) with -1 for
        padding, ``ignore`` (B, M, 4) or None. ``image_hw`` is not needed (the boxes are normalised)."""
        boxes = tf.convert_to_tensor(boxes, tf.float32)
        labels = tf.convert_to_tensor(labels, tf.int32)
        batch = tf.shape(boxes)[0]
        ignore = tf.zeros([batch, 1, 4]) if ignore is None else tf.convert_to_tensor(ignore, tf.float32)
        anchors = tf.constant(self.anchors)
        valid = valid_boxes(boxes, labels)
        iou = iou_with_truth(anchors, boxes, valid)  # (B, A, N)
        matched, best_iou = best_match(iou)
        # every true box's best anchors (all tied at its best IoU) are positive too; a box overlapping
        # no anchor at all claims none (detectron2 would then make every anchor of IoU 0 positive)
        box_best = tf.reduce_max(tf.concat([iou, tf.fill([batch, 1, tf.shape(iou)[2]], -1.0)], axis=1), axis=1)
        claimed = tf.reduce_any((iou == box_best[:, None, :]) & (box_best[:, None, :] > 0.0), axis=2)
        positive = (best_iou >= self.positive) | claimed
        negative = ~positive & (best_iou < self.negative)
        negative &= inside_ignore(anchors, ignore) < self.ignore_overlap
        positive, negative = sample(positive, negative, self.per_image, self.positive_fraction,
                                    batch_seed(self.seed, boxes, labels, ignore))
        rpn_labels = tf.where(positive, 1, tf.where(negative, 0, -1))
        truth = tf.where(positive[..., None], tf.gather(boxes, matched, batch_dims=1), anchors)  # no log(0)
        deltas = tf.where(positive[..., None], encode(truth, anchors, RPN_BOX_WEIGHTS), 0.0)
        return {self.key: {"rpn_labels": rpn_labels, "rpn_deltas": deltas, "boxes": boxes, "labels": labels,
                           "ignore": ignore}}

