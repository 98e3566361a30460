"""What every detector shares after decoding: non-maximum suppression, placing images in the
network input and mapping boxes back, and detections.

Each family decodes its raw outputs to boxes (x_min, y_min, x_max, y_max) normalised to the network
input (0..1) and per-class scores (:meth:`kprune.detectors.base.DetectorFamily.decode`); the boxes
are then mapped back to image pixels by undoing the letterbox or resize of :func:`preprocess_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kprune._keras import tf


def non_max_suppression(
    boxes, scores, score_threshold: float = 0.25, iou_threshold: float = 0.45, max_detections: int = 100
):
    """Per-class NMS with TensorFlow's ``tf.image.combined_non_max_suppression``.

    Args:
        boxes: (N, B, 4) xyxy boxes shared by all classes (one-stage detectors), or (N, B, classes, 4)
            one box per class (a two-stage detector's class-specific boxes): box ``b`` of class ``c``
            is then ``boxes[:, b, c]``, and only boxes of one class suppress each other in either form.
        scores: (N, B, classes) scores.
        score_threshold: boxes scoring below it are dropped (use 0.001 for mAP).
        iou_threshold: a box overlapping a higher-scoring box of its class by more is dropped.
        max_detections: kept per image (and per class).

    Returns:
        A list per image of (boxes (K, 4) xyxy, scores (K,), classes (K,) int) numpy arrays, best first.

    Raises:
        ValueError: thresholds outside [0, 1], max_detections < 1, or boxes that are neither
            (N, B, 4) nor (N, B, classes, 4) for the scores' B and classes.
    """
    for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scores = tf.convert_to_tensor(scores, tf.float32)
    per_class = boxes.shape.rank == 4
    if boxes.shape.rank not in (3, 4) or boxes.shape[-1] != 4 or scores.shape.rank != 3 \
            or (per_class and boxes.shape[2] not in (None, scores.shape[-1])):
        raise ValueError(f"boxes {boxes.shape} and scores {scores.shape}: boxes must be (N, B, 4) or "
                         "(N, B, classes, 4) for scores (N, B, classes)")
    # combined_non_max_suppression takes (N, B, q, 4) yxyx boxes with q = 1 (shared) or q = classes
    yxyx = tf.gather(boxes, [1, 0, 3, 2], axis=-1)
    if not per_class:
        yxyx = yxyx[:, :, None, :]
    nmsed_boxes, nmsed_scores, nmsed_classes, valid = tf.image.combined_non_max_suppression(
        yxyx,
        scores,
        max_output_size_per_class=max_detections,
        max_total_size=max_detections,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        clip_boxes=False,
    )
    results = []
    for i, count in enumerate(valid.numpy()):
        kept = nmsed_boxes[i, :count].numpy()[:, [1, 0, 3, 2]]
        results.append((kept, nmsed_scores[i, :count].numpy(), nmsed_classes[i, :count].numpy().astype(np.int64)))
    return results


@dataclass(frozen=True)
class ImageTransform:
    """How an image was placed in the network input: input_px = image_px * scale + offset."""

    image_hw: Tuple[int, int]
    input_hw: Tuple[int, int]
    scale_xy: Tuple[float, float]
    offset_xy: Tuple[float, float]

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes normalised to the network input back to image pixels, clipped to the image."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        size = np.array([self.input_hw[1], self.input_hw[0]] * 2, dtype=np.float64)
        scale = np.array(self.scale_xy * 2)
        offset = np.array(self.offset_xy * 2)
        pixels = (boxes * size - offset) / scale
        limit = np.array([self.image_hw[1], self.image_hw[0]] * 2, dtype=np.float64)
        return np.clip(pixels, 0, limit)


def image_transform(image_hw: Tuple[int, int], input_hw: Tuple[int, int], letterbox: bool = True) -> ImageTransform:
    """The transform that fits an image into the network input: letterbox (keep the aspect ratio,
    centre, pad) or plain resize."""
    (ih, iw), (nh, nw) = image_hw, input_hw
    if not letterbox:
        return ImageTransform(tuple(image_hw), tuple(input_hw), (nw / iw, nh / ih), (0.0, 0.0))
    scale = min(nw / iw, nh / ih)
    new_w, new_h = max(1, int(round(iw * scale))), max(1, int(round(ih * scale)))
    return ImageTransform(
        tuple(image_hw), tuple(input_hw), (new_w / iw, new_h / ih), ((nw - new_w) // 2, (nh - new_h) // 2)
    )


def preprocess_image(image: np.ndarray, input_hw: Tuple[int, int], letterbox: bool = True):
    """Fit an RGB uint8 image (H, W, 3) into the network input as float32 in [0, 1].

    Letterboxing pads with 0.5 grey, as Darknet does.

    Returns:
        (input image (h, w, 3) float32, :class:`ImageTransform`).
    """
    import cv2

    transform = image_transform(image.shape[:2], input_hw, letterbox)
    new_w = max(1, int(round(image.shape[1] * transform.scale_xy[0])))
    new_h = max(1, int(round(image.shape[0] * transform.scale_xy[1])))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    canvas = np.full((input_hw[0], input_hw[1], 3), 0.5, dtype=np.float32)
    dx, dy = int(transform.offset_xy[0]), int(transform.offset_xy[1])
    canvas[dy: dy + new_h, dx: dx + new_w] = resized
    return canvas, transform


@dataclass(frozen=True)
class Detection:
    box: Tuple[float, float, float, float]  # xyxy in image pixels
    score: float
    class_id: int
    label: Optional[str] = None


def class_mapping(dataset_classes: Sequence[str], model_names: Optional[Sequence[str]],
                  class_map: Dict[str, str]) -> List[int]:
    """For ``head`` mode: the model class index of every dataset class.

    Raises:
        ValueError: the model has no class names, or a dataset class has no counterpart.
    """
    if not model_names:
        raise ValueError("mode head keeps the model's classes, but the model has no class names "
                         "(convert it with --names, or use --mode new-head)")
    lookup = {n.lower(): i for i, n in enumerate(model_names)}
    mapping = []
    for name in dataset_classes:
        target = class_map.get(name, name).lower()
        if target not in lookup:
            raise ValueError(f"dataset class {name!r} matches no class of the model (add it to class_map, "
                             f"e.g. {name}: {model_names[0]}); model classes: {', '.join(model_names)}")
        mapping.append(lookup[target])
    return mapping
