"""YOLO losses over the targets of :mod:`kprune.data.targets`.

YOLOv2 (``region`` heads), YAD2K semantics, per image::

    0.5 * sum over cells and anchors of
        coordinate_scale * mask * |(sigmoid(tx, ty), tw, th) - matching[0:4]|^2
      + object_scale     * mask * (target - sigmoid(to))^2        target = IoU (rescore) or 1
      + no_object_scale  * (1 - mask) * [best IoU < threshold] * [not in an ignore region] * sigmoid(to)^2
      + class_scale      * mask * |one_hot(class) - softmax(class logits)|^2

(with ``class_loss="cross_entropy"`` the class term is ``class_scale * mask * CE(one_hot, logits)``
instead, not halved: its gradient on the logits, softmax - one_hot, is the delta Darknet's region
layer applies; YAD2K's squared error on the probabilities learns classes more slowly)

where "best IoU" is the IoU of the predicted box with the true box it overlaps most (YAD2K's
``best_ious``; also the rescore target, held constant for the gradient). A prediction lies in an
ignore region (crowd, DontCare, difficult) when at least half of its area is inside one; it then
counts neither as object nor as background.

YOLOv3 (``yolo`` heads), Darknet / keras-yolo3 semantics, per image and summed over heads::

    mask * (2 - w*h) * (BCE(offset, tx ty) + 0.5 * |(tw, th) - matching[2:4]|^2)
  + BCE(mask, objectness), the negatives only where best IoU < threshold and outside ignore regions
  + mask * sum BCE(one_hot(class), class logits)

Heads of the AlexeyAB fork (YOLOv4, YOLOv7) predict boxes as they decode them (``scale_x_y``,
``new_coords``: :func:`kprune.detectors.yolo.decode.cell_offset_and_size`); a ``new_coords`` head
outputs probabilities, so its cross-entropies take probabilities. With ``box_loss`` ``ciou`` (or
``iou``, ``giou``, ``diou``) the coordinate term is ``iou_normalizer * (1 - CIoU)`` of the predicted
and the true box instead, without the ``2 - w*h`` weight, as the fork trains ``iou_loss=ciou``.

Both are averaged over the images of the batch, not summed, so the learning rate does not depend on
the batch size. Raw widths are clipped before ``exp`` so that a wild prediction cannot make NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from kprune._keras import tf
from kprune.boxes import paired_ious
from kprune.config import Float, schema
from kprune.darknet.cfg import YOLO_BOX_LOSSES
from kprune.detectors.yolo.decode import cell_offset_and_size
from kprune.detectors.yolo.targets import TargetEncoder
from kprune.models.layers import detection_heads

_MAX_LOG_WH = 8.0  # exp(8) ~ 3000 times the anchor: beyond any real box, far below overflow


@schema(frozen=True)
class LossOptions:
    """Scales and thresholds: YAD2K's defaults for YOLOv2 (:meth:`YoloLoss.from_model` gives YOLOv3
    models ``object_scale`` 1 and ``threshold`` 0.5, Darknet's).

    ``small_box_scale``: region heads weigh each coordinate error by ``2 - w h`` of the true box
    (in image units), as Darknet's region layer does and YAD2K does not; YOLOv3 heads always do.

    ``box_loss`` (yolo heads): ``mse`` (YOLOv3's coordinate terms) or ``iou`` / ``giou`` / ``diou`` /
    ``ciou``: ``iou_normalizer * (1 - that IoU)`` of the predicted and the true box, as the AlexeyAB
    fork trains with ``iou_loss``. A converted fork model's defaults are its cfg's ``iou_loss``,
    ``iou_normalizer``, ``cls_normalizer`` (``class_scale``) and ``obj_normalizer`` (``object_scale``
    and ``no_object_scale``).
    """

    object_scale: Float = 5.0
    no_object_scale: Float = 1.0
    class_scale: Float = 1.0
    coordinate_scale: Float = 1.0
    threshold: Float = 0.6
    rescore: bool = True
    ignore_overlap: Float = 0.5
    class_loss: str = "mse"
    small_box_scale: bool = False
    box_loss: str = "mse"
    iou_normalizer: Float = 0.75

    def __post_init__(self):
        for name in ("object_scale", "no_object_scale", "class_scale", "coordinate_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss option {name} = {getattr(self, name)}: must be >= 0")
        for name in ("threshold", "ignore_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"loss option {name} = {getattr(self, name)}: must be in [0, 1]")
        if self.box_loss not in YOLO_BOX_LOSSES:
            raise ValueError(f"loss option box_loss = {self.box_loss!r}: choose one of {', '.join(YOLO_BOX_LOSSES)}")
        if self.iou_normalizer < 0:
            raise ValueError(f"loss option iou_normalizer = {self.iou_normalizer}: must be >= 0")
        if self.class_loss not in ("mse", "cross_entropy"):
            raise ValueError(f"loss option class_loss = {self.class_loss!r}: choose mse (YAD2K) or cross_entropy")


@dataclass(frozen=True)
class LossHead:
    name: str
    kind: str
    classes: int
    stride: int
    anchors_px: Sequence[Sequence[float]]
    scale_x_y: float = 1.0
    new_coords: int = 0


def _xyxy(centre, size):
    return tf.concat([centre - size / 2, centre + size / 2], axis=-1)


def _area(boxes):
    return tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def _intersection(a, b):
    top_left = tf.maximum(a[..., 0:2], b[..., 0:2])
    bottom_right = tf.minimum(a[..., 2:4], b[..., 2:4])
    return tf.reduce_prod(tf.maximum(bottom_right - top_left, 0.0), axis=-1)


def _max_or_zero(values):
    """Maximum over the last axis, 0 when that axis is empty."""
    return tf.reduce_max(tf.concat([values, tf.zeros_like(values[..., :1])], axis=-1), axis=-1)


def _best_iou(pred_xyxy, true_boxes):
    """Highest IoU of every predicted box (B, H, W, A, 4) with the true boxes (B, N, 5) of its image."""
    true_xyxy = _xyxy(true_boxes[..., 0:2], true_boxes[..., 2:4])[:, None, None, None]  # (B, 1, 1, 1, N, 4)
    pred = pred_xyxy[..., None, :]  # (B, H, W, A, 1, 4)
    inter = _intersection(pred, true_xyxy)
    iou = inter / tf.maximum(_area(pred) + _area(true_xyxy) - inter, 1e-9)
    valid = (true_boxes[..., 2] > 0)[:, None, None, None, :]
    return _max_or_zero(tf.where(valid, iou, 0.0))


def _in_ignore(pred_xyxy, ignore, overlap: float):
    """Whether at least ``overlap`` of each predicted box lies inside an ignore region (B, M, 4 xyxy)."""
    regions = ignore[:, None, None, None]  # (B, 1, 1, 1, M, 4)
    pred = pred_xyxy[..., None, :]
    inside = _intersection(pred, regions) / tf.maximum(_area(pred), 1e-9)
    valid = (_area(ignore) > 0)[:, None, None, None, :]
    return _max_or_zero(tf.where(valid, inside, 0.0)) >= overlap


class YoloLoss:
    """The loss of a YOLO model: one term per head kind, averaged per image.

    Args:
        heads: per head its name, kind, classes, stride and anchors in input pixels.
        options: scales and thresholds.

    Use :meth:`from_model`; call it with the pipeline's targets and the model's raw outputs.
    """

    terms = ("coordinates", "objects", "no_objects", "classes", "loss")

    def __init__(self, heads: Sequence[LossHead], options: LossOptions = LossOptions()):
        self.heads = list(heads)
        self.options = options

    @classmethod
    def from_model(cls, model, options: LossOptions | None = None) -> "YoloLoss":
        encoder = TargetEncoder.from_model(model)
        kinds = {h.name: h for h in detection_heads(model)}
        heads = [
            LossHead(spec.name, kinds[spec.name].kind, kinds[spec.name].classes, spec.stride,
                     encoder.anchors_px[list(spec.anchor_ids)].tolist(), kinds[spec.name].scale_x_y,
                     kinds[spec.name].new_coords)
            for spec in encoder.heads
        ]
        if options is None:
            options = LossOptions(object_scale=1.0, threshold=0.5) if heads[0].kind == "yolo" else LossOptions()
        return cls(heads, options)

    def __call__(self, targets: Dict, outputs: Sequence) -> Dict[str, tf.Tensor]:
        """Loss terms, each averaged over the batch: ``coordinates``, ``objects``, ``no_objects``,
        ``classes`` and their sum ``loss``."""
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if len(outputs) != len(self.heads):
            raise ValueError(f"{len(outputs)} outputs for a loss with {len(self.heads)} heads")
        terms: Dict[str, tf.Tensor] = {}
        for head, output in zip(self.heads, outputs):
            per_head = self._head_terms(head, targets, tf.cast(output, tf.float32))
            for key, value in per_head.items():
                terms[key] = terms.get(key, 0.0) + value
        terms["loss"] = tf.add_n(list(terms.values()))
        return terms

    def _head_terms(self, head: LossHead, targets: Dict, output) -> Dict[str, tf.Tensor]:
        o = self.options
        shape = tf.shape(output)
        batch, grid_h, grid_w = shape[0], shape[1], shape[2]
        anchors = tf.constant(head.anchors_px, tf.float32)
        x = tf.reshape(output, [batch, grid_h, grid_w, len(head.anchors_px), 5 + head.classes])
        cols, rows = tf.meshgrid(tf.range(grid_w), tf.range(grid_h))
        cell = tf.cast(tf.stack([cols, rows], axis=-1)[None, :, :, None, :], tf.float32)
        grid = tf.cast(tf.stack([grid_w, grid_h]), tf.float32)
        input_wh = grid * float(head.stride)
        xy, size = cell_offset_and_size(x, head.scale_x_y, head.new_coords, max_log_size=_MAX_LOG_WH)
        pred_xyxy = _xyxy((cell + xy) / grid, size * anchors / input_wh)

        best_iou = tf.stop_gradient(_best_iou(pred_xyxy, targets["true_boxes"]))
        background = tf.cast(best_iou < o.threshold, tf.float32)
        if "ignore" in targets:
            background *= 1.0 - tf.cast(_in_ignore(pred_xyxy, targets["ignore"], o.ignore_overlap), tf.float32)
        mask = targets[head.name]["mask"][..., 0]
        matching = targets[head.name]["matching"]
        one_hot = tf.one_hot(tf.cast(matching[..., 4], tf.int32), head.classes)
        images = tf.cast(batch, tf.float32)
        # Darknet weighs the coordinates of a small true box up to twice as much: 2 - w * h (image units)
        true_wh = tf.exp(matching[..., 2:4]) * anchors / input_wh
        small_box = 2.0 - true_wh[..., 0] * true_wh[..., 1]

        def per_image(value):
            return tf.reduce_sum(value) / images

        if head.kind == "region":
            confidence = tf.sigmoid(x[..., 4])
            target = best_iou if o.rescore else 1.0
            # the raw widths here: a clipped one would get no gradient back from beyond the clip
            coords = tf.reduce_sum(tf.square(matching[..., 0:4] - tf.concat([xy, x[..., 2:4]], -1)), -1)
            if o.small_box_scale:
                coords *= small_box
            if o.class_loss == "mse":
                classes = 0.5 * tf.reduce_sum(tf.square(one_hot - tf.nn.softmax(x[..., 5:])), -1)
            else:
                classes = tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=x[..., 5:])
            return {
                "coordinates": 0.5 * o.coordinate_scale * per_image(mask * coords),
                "objects": 0.5 * o.object_scale * per_image(mask * tf.square(target - confidence)),
                "no_objects": 0.5 * o.no_object_scale * per_image((1 - mask) * background * tf.square(confidence)),
                "classes": o.class_scale * per_image(mask * classes),
            }
        bce = _bce_of_probabilities if head.new_coords else tf.nn.sigmoid_cross_entropy_with_logits
        if o.box_loss != "mse":
            true_xyxy = _xyxy((cell + matching[..., 0:2]) / grid, true_wh)
            coords = o.iou_normalizer * (1.0 - paired_ious(pred_xyxy, true_xyxy)[o.box_loss])
            small_box = 1.0  # the fork weighs IoU losses alike for every box size
        else:
            coords = _mse_coordinates(head, matching, x, bce)
        objectness = bce(labels=mask, logits=x[..., 4])
        classes = tf.reduce_sum(bce(labels=one_hot, logits=x[..., 5:]), -1)
        return {
            "coordinates": o.coordinate_scale * per_image(mask * small_box * coords),
            "objects": o.object_scale * per_image(mask * objectness),
            "no_objects": o.no_object_scale * per_image((1 - mask) * background * objectness),
            "classes": o.class_scale * per_image(mask * classes),
        }


def _bce_of_probabilities(labels, logits):
    """Binary cross-entropy of probabilities (the outputs of a ``new_coords`` head, which applied the
    logistic already), clipped away from 0 and 1; named like TensorFlow's so that either serves."""
    p = tf.clip_by_value(logits, 1e-7, 1.0 - 1e-7)
    return -(labels * tf.math.log(p) + (1.0 - labels) * tf.math.log(1.0 - p))


def _mse_coordinates(head: LossHead, matching, x, bce):
    """YOLOv3's coordinate terms: cross-entropy of the centre offsets, half the squared error of the
    sizes, in the head's own parametrisation: a fork head's ``scale_x_y`` s shifts the target offset
    to (offset + (s - 1) / 2) / s; ``new_coords`` sizes are (2 p)^2 anchors, so the target of p is
    sqrt(size in anchors) / 2 instead of the log size."""
    s = head.scale_x_y
    offset = (matching[..., 0:2] + (s - 1) / 2) / s
    if head.new_coords:
        sizes = tf.square(tf.sqrt(tf.exp(matching[..., 2:4])) / 2 - x[..., 2:4])
    else:
        sizes = tf.square(matching[..., 2:4] - x[..., 2:4])
    return tf.reduce_sum(bce(labels=offset, logits=x[..., 0:2]), -1) + 0.5 * tf.reduce_sum(sizes, -1)


def loss_terms() -> List[str]:
    """Names of the terms a :class:`YoloLoss` returns, ``loss`` last."""
    return list(YoloLoss.terms)
