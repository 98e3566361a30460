"""Running a model on files: raw outputs from .npy arrays, detections drawn on images, COCO results."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from kprune.models.head import Detection


def check_input_batch(images: np.ndarray, model, source: str = "input") -> np.ndarray:
    """Validate float images already at the model's input size; return them as an NHWC float32 batch.

    Raises:
        ValueError: wrong rank or size, non-finite values, or values outside [0, 1] (names ``source``).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    expected = tuple(model.input_shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{source}: shape {images.shape} does not fit the model; expected (H, W, C) or (N, H, W, C) "
            f"with (H, W, C) = {expected}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{source}: dtype {images.dtype}; expected float images in [0, 1]")
    images = images.astype(np.float32)
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{source}: contains NaN or Inf")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{source}: values range over [{low:g}, {high:g}]; expected [0, 1] (divide by 255?)")
    return images


def predict_raw(model, images: np.ndarray, batch_size: int = 8) -> List[np.ndarray]:
    """Raw head outputs (before decoding) for an NHWC batch, one array per model output."""
    outputs = model.predict(images, batch_size=batch_size, verbose=0)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def read_image(path: str) -> np.ndarray:
    """Read an image file as RGB uint8.

    Raises:
        ValueError: the file is missing or not a readable image.
    """
    import cv2

    if not os.path.isfile(path):
        raise ValueError(f"image {path} does not exist")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"image {path} could not be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def draw_detections(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """A copy of an RGB image with each detection's box and "label score" drawn on it."""
    import cv2

    canvas = image.copy()
    for det in detections:
        hue = (det.class_id * 47) % 180
        colour = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
        x0, y0, x1, y1 = (int(round(v)) for v in det.box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, 2)
        text = f"{det.label if det.label is not None else det.class_id} {det.score:.2f}"
        cv2.putText(canvas, text, (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return canvas


def coco_results(
    detections: Sequence[Sequence[Detection]], image_ids: Sequence[int], file_names: Optional[Sequence[str]] = None
) -> List[Dict]:
    """Detections in COCO results format: image_id, category_id (the model's class index), bbox
    [x, y, w, h] in pixels, score; plus file_name and category_name when known."""
    results = []
    for index, (image_id, dets) in enumerate(zip(image_ids, detections)):
        for det in dets:
            x0, y0, x1, y1 = det.box
            entry = {
                "image_id": int(image_id),
                "category_id": int(det.class_id),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(det.score, 5),
            }
            if det.label is not None:
                entry["category_name"] = det.label
            if file_names is not None:
                entry["file_name"] = file_names[index]
            results.append(entry)
    return results


def read_names(path: str) -> List[str]:
    """Class names, one per line (Darknet's .names files); blank lines are ignored.

    Raises:
        ValueError: the file is missing or empty.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
    except OSError as exc:
        raise ValueError(f"cannot read names file {path}: {exc.strerror}") from None
    if not names:
        raise ValueError(f"names file {path} lists no class")
    return names
