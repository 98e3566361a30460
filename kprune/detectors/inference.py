"""Running a detector of any family on images: decode with its family, then the shared
non-maximum suppression, boxes mapped back to each image's pixels."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from kprune.detectors import family_of
from kprune.fileio import write_json_atomic
from kprune.models.head import Detection, non_max_suppression, preprocess_image
from kprune.models.inference import coco_results, draw_detections, read_image


def decode_outputs(model, outputs: Sequence):
    """Raw outputs of ``model`` -> boxes (N, B, 4) xyxy normalised to the input, scores (N, B, classes)."""
    return family_of(model).decode(model, outputs)


def decode_and_suppress(model, outputs, score_threshold: float = 0.25, iou_threshold: float = 0.45,
                        max_detections: int = 100) -> list:
    """Raw outputs of ``model`` for a batch (a tensor or a list, one per output) -> the detections of
    each image: the family's decoding, then the shared per-class NMS
    (:func:`~kprune.models.head.non_max_suppression`, whose arguments and results these are)."""
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return non_max_suppression(*decode_outputs(model, outputs), score_threshold, iou_threshold, max_detections)


def detect(
    model,
    images: Sequence[np.ndarray],
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    letterbox: bool = True,
    names: Optional[Sequence[str]] = None,
    predict=None,
    detections=None,
) -> List[List[Detection]]:
    """Run a detector on RGB uint8 images of any size; boxes come back in each image's pixels.

    Args:
        model: a detector of any family.
        images: RGB uint8 arrays (H, W, 3).
        score_threshold, iou_threshold, max_detections: see :func:`non_max_suppression`.
        letterbox: letterbox (True) or stretch (False) the images into the input.
        names: class names; default the names stored in the model's head, if any.
        predict: a function of a float batch (1, H, W, 3) giving the raw outputs in the model's order
            instead of the model (a TFLite file converted from it, :class:`kprune.models.litert.TFLiteRunner`).
        detections: a function of such a batch giving its detections as
            :func:`~kprune.models.head.non_max_suppression` does, instead of the model, the decoding and
            NMS (a file with TFLite's post-processing op, :class:`kprune.models.litert.DetectionRunner`):
            its own NMS IoU and detection count apply; ``score_threshold`` is applied on top.

    Returns:
        One list of :class:`Detection` per image, best first.

    Raises:
        ValueError: an image that is not uint8 (H, W, 3), names whose count is not the model's, or
            both ``predict`` and ``detections``.
    """
    if predict is not None and detections is not None:
        raise ValueError("give predict (raw outputs) or detections, not both")
    input_hw = tuple(model.input_shape[1:3])
    family = family_of(model)
    classes = family.num_classes(model)
    if names is None:
        names = family.class_names(model)
    elif len(names) != classes:
        raise ValueError(f"{len(names)} class names given for a model with {classes} classes")
    results = []
    for index, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {index}: expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        batch, transform = preprocess_image(image, input_hw, letterbox)
        if detections is None:
            outputs = model(batch[None], training=False) if predict is None else predict(batch[None])
            (kept, kept_scores, kept_classes), = decode_and_suppress(model, outputs, score_threshold, iou_threshold,
                                                                     max_detections)
        else:
            (kept, kept_scores, kept_classes), = detections(batch[None])
            above = kept_scores >= score_threshold
            kept, kept_scores, kept_classes = kept[above], kept_scores[above], kept_classes[above]
        pixels = transform.to_image(kept)
        results.append([
            Detection(tuple(float(v) for v in box), float(score), int(cls),
                      names[cls] if names is not None else None)
            for box, score, cls in zip(pixels, kept_scores, kept_classes)
        ])
    return results


def detect_files(
    model,
    paths: Sequence[str],
    out_dir: str,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    letterbox: bool = True,
    names: Optional[Sequence[str]] = None,
    progress: bool = True,
    predict=None,
    detections=None,
) -> List[Dict]:
    """Detect objects in image files; write each image with its boxes drawn and ``detections.json``.
    ``predict``, ``detections``: raw outputs or detections from elsewhere than the model, e.g. a TFLite
    file (see :func:`detect`).

    Output images are named after the inputs' stems (``.jpg``); a stem seen before gets ``_N`` added
    so no output overwrites another.

    Returns:
        The COCO results written to ``out_dir/detections.json`` (image_id = position in ``paths``).

    Raises:
        ValueError: an unreadable image or an output that cannot be written.
    """
    import cv2
    from tqdm import tqdm


    os.makedirs(out_dir, exist_ok=True)
    all_detections, used = [], set()
    for index, path in enumerate(tqdm(paths, desc="detect", unit="image", disable=not progress or len(paths) < 2)):
        image = read_image(path)
        (found,) = detect(model, [image], score_threshold, iou_threshold, letterbox=letterbox, names=names,
                          predict=predict, detections=detections)
        all_detections.append(found)
        stem = os.path.splitext(os.path.basename(path))[0]
        name = stem if stem not in used else f"{stem}_{index}"
        used.add(name)
        target = os.path.join(out_dir, name + ".jpg")
        if not cv2.imwrite(target, cv2.cvtColor(draw_detections(image, found), cv2.COLOR_RGB2BGR)):
            raise ValueError(f"cannot write {target}")
    results = coco_results(all_detections, range(len(paths)), list(paths))
    write_json_atomic(os.path.join(out_dir, "detections.json"), results)
    return results
