"""YOLO training targets, computed with TensorFlow ops inside the input pipeline.

For each true box: the head and anchor whose shape matches it best (IoU of width/height with the
centres aligned, over every anchor of the model), the grid cell holding its centre, and YAD2K's
encoding of it in that cell::

    detectors_mask[b, i, j, a]      = 1
    matching_true_boxes[b, i, j, a] = (x * grid_w - j, y * grid_h - i,
                                       log(w_px / anchor_w_px), log(h_px / anchor_h_px), class)

When two boxes fall on the same cell and anchor, the later one in the list wins, as in YAD2K's loop
(made deterministic here by taking the largest box index per slot). The padded list of true boxes
(centre x, centre y, w, h, class; zeros for padding) goes along for the loss's ignore term.

Anchors are handled in input pixels so that one rule serves both head kinds: a region (YOLOv2) head
gives them in grid cells (times the head's stride), a yolo (YOLOv3) head in pixels, each head using
the anchors of its ``mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from kprune._keras import tf
from kprune.models.layers import detection_heads


@dataclass(frozen=True)
class HeadTarget:
    """What the encoder needs to know of one detection head."""

    name: str  # the head's layer name: the key of its targets
    stride: int  # input pixels per grid cell
    anchor_ids: Sequence[int]  # indices into the encoder's anchor list, in the head's order


class TargetEncoder:
    """Computes detectors_mask and matching_true_boxes for every head of a model.

    Args:
        heads: the heads, each with its stride and anchor indices.
        anchors_px: every anchor of the model as (width, height) in input pixels.

    Raises:
        ValueError: an anchor index out of range, or listed twice by one head.

    An anchor may belong to several heads (yolov4-tiny's masks 3,4,5 and 1,2,3 share anchor 3): a
    box whose best anchor it is then has targets in each of them, as in the fork, where every yolo
    layer takes the truths whose best anchor is in its own mask.
    """

    def __init__(self, heads: Sequence[HeadTarget], anchors_px: Sequence[Sequence[float]]):
        self.heads = list(heads)
        self.anchors_px = np.asarray(anchors_px, np.float32).reshape(-1, 2)
        member = np.zeros((len(self.heads), len(self.anchors_px)), bool)
        local = np.zeros((len(self.heads), len(self.anchors_px)), np.int32)
        for h, head in enumerate(self.heads):
            ids = list(head.anchor_ids)
            if any(i < 0 or i >= len(self.anchors_px) for i in ids) or len(set(ids)) != len(ids):
                raise ValueError(f"head {head.name}: anchor indices {ids} must be distinct and below "
                                 f"{len(self.anchors_px)}")
            member[h, ids] = True
            local[h, ids] = np.arange(len(ids))
        # an anchor no head uses (possible in a cfg) must never win the match
        self._usable = member.any(axis=0)
        self._member, self._local = member, local

    @classmethod
    def from_model(cls, model) -> "TargetEncoder":
        """The encoder of a model built by kprune (its DetectionHead layers give kind, anchors and mask).

        Raises:
            ValueError: the model has no detection head, or the heads disagree on the anchor list.
        """
        heads = detection_heads(model)
        input_h = model.input_shape[1]
        specs: List[HeadTarget] = []
        if heads[0].kind == "region":
            if len(heads) != 1:
                raise ValueError(f"model {model.name!r}: one region head expected, found {len(heads)}")
            head = heads[0]
            stride = input_h // head.output.shape[1]
            anchors = np.asarray(head.head_anchors, np.float32) * stride
            return cls([HeadTarget(head.name, stride, list(range(head.num_anchors)))], anchors)
        anchors = np.asarray(heads[0].anchors, np.float32)
        for head in heads:
            if not np.allclose(np.asarray(head.anchors, np.float32), anchors):
                raise ValueError(f"model {model.name!r}: head {head.name} lists other anchors than {heads[0].name}")
            specs.append(HeadTarget(head.name, input_h // head.output.shape[1], list(head.mask)))
        return cls(specs, anchors)

    def best_anchors(self, wh_px):
        """Index of the best anchor by shape IoU for boxes of width/height ``wh_px`` (..., 2)."""
        anchors = tf.constant(self.anchors_px)
        wh = tf.expand_dims(wh_px, -2)  # (..., 1, 2) against (K, 2)
        inter = tf.reduce_prod(tf.minimum(wh, anchors), axis=-1)
        union = tf.reduce_prod(wh, axis=-1) + tf.reduce_prod(anchors, axis=-1) - inter
        iou = inter / tf.maximum(union, 1e-12)
        iou = tf.where(tf.constant(self._usable), iou, -1.0)
        return tf.argmax(iou, axis=-1, output_type=tf.int32)

    def __call__(self, boxes, labels, image_hw, ignore=None) -> Dict[str, object]:
        """Targets of a batch.

        Args:
            boxes: (B, N, 4) normalised xyxy boxes, padded.
            labels: (B, N) int32 class labels, -1 marking padding.
            image_hw: the network input (height, width) of this batch (ints or a tensor).
            ignore: not used here: the loss reads the pipeline's ignore regions itself, because
                whether a prediction lies in one depends on the predicted box.

        Returns:
            dict: ``true_boxes`` (B, N, 5) as (x, y, w, h, class) normalised, zero for padding; and for
            each head name a dict with ``mask`` (B, gh, gw, A, 1) and ``matching`` (B, gh, gw, A, 5).
        """
        boxes = tf.convert_to_tensor(boxes, tf.float32)
        labels = tf.convert_to_tensor(labels, tf.int32)
        height = tf.cast(image_hw[0], tf.int32)
        width = tf.cast(image_hw[1], tf.int32)
        size = tf.cast(tf.stack([width, height]), tf.float32)
        centre = (boxes[..., 0:2] + boxes[..., 2:4]) / 2.0
        wh = boxes[..., 2:4] - boxes[..., 0:2]
        valid = (labels >= 0) & (wh[..., 0] > 0) & (wh[..., 1] > 0)
        validf = tf.cast(valid, tf.float32)[..., None]
        true_boxes = tf.concat([centre, wh, tf.cast(labels, tf.float32)[..., None]], axis=-1) * validf

        wh_px = tf.maximum(wh * size, 1e-6)
        best = self.best_anchors(wh_px)  # (B, N)
        batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
        box_index = tf.reshape(tf.range(batch * count), [batch, count])
        image_index = tf.repeat(tf.range(batch)[:, None], count, axis=1)
        anchor_wh = tf.gather(tf.constant(self.anchors_px), best)
        log_wh = tf.math.log(wh_px / anchor_wh)
        targets: Dict[str, object] = {"true_boxes": true_boxes}
        for h, head in enumerate(self.heads):
            grid_h, grid_w = height // head.stride, width // head.stride
            grid = tf.cast(tf.stack([grid_w, grid_h]), tf.float32)
            cell = tf.clip_by_value(tf.cast(tf.floor(centre * grid), tf.int32), 0, tf.cast(grid, tf.int32) - 1)
            local = tf.gather(tf.constant(self._local[h]), best)
            num_anchors = len(head.anchor_ids)
            slot = ((image_index * grid_h + cell[..., 1]) * grid_w + cell[..., 0]) * num_anchors + local
            slots = batch * grid_h * grid_w * num_anchors
            mine = valid & tf.gather(tf.constant(self._member[h]), best)
            slot = tf.where(mine, slot, slots)  # boxes of other heads or padding go to a spare slot
            winner = tf.math.unsorted_segment_max(
                tf.reshape(box_index, [-1]), tf.reshape(slot, [-1]), slots + 1
            )[:slots]
            has_box = winner >= 0  # an empty segment holds the smallest int32
            offset = centre * grid - tf.cast(cell, tf.float32)
            encoded = tf.concat([offset, log_wh, tf.cast(labels, tf.float32)[..., None]], axis=-1)
            matching = tf.gather(tf.reshape(encoded, [-1, 5]), tf.maximum(winner, 0))
            matching = matching * tf.cast(has_box, tf.float32)[:, None]
            shape = tf.stack([batch, grid_h, grid_w, num_anchors])
            targets[head.name] = {
                "mask": tf.reshape(tf.cast(has_box, tf.float32), tf.concat([shape, [1]], 0)),
                "matching": tf.reshape(matching, tf.concat([shape, [5]], 0)),
            }
        return targets
