"""mAP: VOC-style AP at IoU 0.5 (all-point and 11-point) and COCO AP from pycocotools itself.

Conventions (see DESIGN.md, Evaluation):

- Detections are taken at score >= 0.001, at most 100 per image, or it is not mAP.
- IoU on continuous coordinates (area = w * h).
- VOC matching, per class, detections by decreasing score: each detection goes to the true box it
  overlaps most; IoU >= 0.5 and that box still free -> true positive; taken -> false positive (the
  VOC devkit's rule). A detection that is not a true positive and lies at least half inside an
  ignore region (crowd, DontCare, difficult) counts as neither.
- COCO: pycocotools' COCOeval on the same boxes; ignore regions are crowd annotations there.
- Class ids are the model's 0-based class indices, in detections and ground truth alike.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from kprune.boxes import iou_matrix, xywh_to_xyxy, xyxy_to_xywh
from kprune.models.litert import DetectionRunner, TFLiteRunner, detection_op_options

# The metrics (and ``kprune evaluate --detections``) need no TensorFlow, which takes seconds to
# import: the functions that run models import the modules that load it (data, detectors,
# models.head, models.io) when they are called.

SCORE_THRESHOLD = 0.001
MAX_DETECTIONS = 100


@dataclass
class ImageTruth:
    """Ground truth of one image, in pixels: boxes (N, 4) xyxy with labels (N,), and ignore regions
    (M, 4) xyxy with labels (M,), -1 meaning "any class"."""

    image_id: int
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))


@dataclass
class ImageDetections:
    """Detections of one image, in pixels: boxes (K, 4) xyxy, scores (K,), labels (K,)."""

    image_id: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def voc_ap(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """Area under the precision/recall curve.

    All-point (VOC 2010+): precision made monotone from the right, summed over recall steps.
    11-point (VOC 2007): mean of the best precision at recall >= 0, 0.1, ..., 1.
    """
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                              for t in np.linspace(0, 1, 11)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _inside_fraction(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(K, M) fraction of each box's area inside each region."""
    top_left = np.maximum(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=-1)[:, None]
    return inter / np.maximum(area, 1e-12)


def voc_evaluate(
    detections: Sequence[ImageDetections], truths: Sequence[ImageTruth], num_classes: int, iou: float = 0.5
) -> Dict[int, dict]:
    """Per class: ``ap`` (all-point), ``ap_11pt``, ``recall`` (at the last detection), ``precision``
    there, ``ground_truth`` and ``detections`` counts (ignored detections not counted)."""
    by_image = {d.image_id: d for d in detections}
    results = {}
    for label in range(num_classes):
        scored = []  # (score, is true positive)
        total = 0
        for truth in truths:
            gt = truth.boxes[truth.labels == label].reshape(-1, 4)
            total += len(gt)
            det = by_image.get(truth.image_id)
            if det is None:
                continue
            keep = det.labels == label
            boxes, scores = det.boxes[keep].reshape(-1, 4), det.scores[keep]
            order = np.argsort(-scores, kind="stable")
            boxes, scores = boxes[order], scores[order]
            overlaps = iou_matrix(boxes, gt) if len(gt) else np.zeros((len(boxes), 0))
            regions = truth.ignore[(truth.ignore_labels == -1) | (truth.ignore_labels == label)].reshape(-1, 4)
            inside = _inside_fraction(boxes, regions).max(axis=1) if len(regions) and len(boxes) else np.zeros(len(boxes))
            taken = np.zeros(len(gt), bool)
            for k in range(len(boxes)):
                best = int(np.argmax(overlaps[k])) if len(gt) else -1
                if best >= 0 and overlaps[k, best] >= iou and not taken[best]:
                    taken[best] = True
                    scored.append((scores[k], True))
                elif inside[k] >= 0.5:
                    continue
                else:
                    scored.append((scores[k], False))
        scored.sort(key=lambda item: -item[0])
        hits = np.array([t for _, t in scored], bool)
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        recall = tp / max(total, 1)
        precision = tp / np.maximum(tp + fp, 1e-12)
        results[label] = {
            "ap": voc_ap(recall, precision) if total else float("nan"),
            "ap_11pt": voc_ap(recall, precision, eleven_point=True) if total else float("nan"),
            "recall": float(recall[-1]) if len(recall) else 0.0,
            "precision": float(precision[-1]) if len(precision) else 0.0,
            "ground_truth": int(total),
            "detections": int(len(hits)),
        }
    return results


def coco_ground_truth(truths: Sequence[ImageTruth], names: Sequence[str]) -> dict:
    """The ground truth as a COCO instances dict (category ids = class indices; ignore regions as
    crowd annotations, one per class when they belong to any class)."""
    annotations = []

    def add(image_id, box, label, crowd):
        x, y, w, h = (float(v) for v in xyxy_to_xywh(np.asarray(box, np.float64)))
        annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label),
                            "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(crowd)})

    for truth in truths:
        for box, label in zip(truth.boxes, truth.labels):
            add(truth.image_id, box, label, 0)
        for box, label in zip(truth.ignore, truth.ignore_labels):
            for cls in (range(len(names)) if label < 0 else [label]):
                add(truth.image_id, box, cls, 1)
    return {
        "images": [{"id": int(t.image_id), "height": int(t.height), "width": int(t.width)} for t in truths],
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
    }


def coco_detections(detections: Sequence[ImageDetections]) -> List[dict]:
    """Detections in the COCO results format."""
    results = []
    for det in detections:
        for box, score, label in zip(det.boxes, det.scores, det.labels):
            x, y, w, h = (float(v) for v in xyxy_to_xywh(np.asarray(box, np.float64)))
            results.append({"image_id": int(det.image_id), "category_id": int(label), "bbox": [x, y, w, h],
                            "score": float(score)})
    return results


def coco_evaluate(ground_truth: dict, results: List[dict]) -> dict:
    """COCO AP with pycocotools: ``coco_map`` (AP@[.5:.95]), ``coco_ap50``, ``coco_ap75`` and the
    printed summary; zeros when there are no detections."""
    if not results:
        return {"coco_map": 0.0, "coco_ap50": 0.0, "coco_ap75": 0.0, "coco_summary": "no detections"}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation.summarize()
    stats = evaluation.stats
    return {"coco_map": float(stats[0]), "coco_ap50": float(stats[1]), "coco_ap75": float(stats[2]),
            "coco_summary": summary.getvalue()}


def evaluate_detections(
    detections: Sequence[ImageDetections], truths: Sequence[ImageTruth], names: Sequence[str]
) -> dict:
    """Every figure at once: ``map50`` (VOC all-point, IoU 0.5), ``map50_11pt``, ``coco_map``,
    ``coco_ap50``, ``coco_ap75``, ``per_class`` (name -> ap, ap_11pt, recall, ...), ``images``.

    mAP averages over the classes that have ground truth."""
    per_class = voc_evaluate(detections, truths, len(names))
    present = [v for v in per_class.values() if v["ground_truth"] > 0]
    result = {
        "map50": float(np.mean([v["ap"] for v in present])) if present else 0.0,
        "map50_11pt": float(np.mean([v["ap_11pt"] for v in present])) if present else 0.0,
    }
    result.update(coco_evaluate(coco_ground_truth(truths, names), coco_detections(detections)))
    result["per_class"] = {names[k]: v for k, v in per_class.items()}
    result["images"] = len(truths)
    return result


def truths_from_coco(data: dict) -> tuple[List[ImageTruth], List[str], Dict[int, int]]:
    """Ground truth from a COCO instances dict (crowd boxes become ignore regions of their class).

    Returns:
        (truths, class names, category id -> class index): the categories sorted by id are the
        classes 0..K-1 (so kprune's own files, with ids 0..K-1, map to themselves).
    """
    ids = sorted(c["id"] for c in data["categories"])
    names_by_id = {c["id"]: c["name"] for c in data["categories"]}
    index = {category: k for k, category in enumerate(ids)}
    per_image: Dict[int, dict] = {im["id"]: {"im": im, "boxes": [], "labels": [], "ignore": [], "ignore_labels": []}
                                  for im in data["images"]}
    for ann in data["annotations"]:
        entry = per_image.get(ann["image_id"])
        if entry is None:
            raise ValueError(f"annotation {ann.get('id')} refers to image {ann['image_id']}, not in images")
        box = xywh_to_xyxy(np.asarray(ann["bbox"], np.float64))
        kind = "ignore" if ann.get("iscrowd", 0) else "boxes"
        entry[kind].append(box)
        entry["ignore_labels" if kind == "ignore" else "labels"].append(index[ann["category_id"]])
    truths = [
        ImageTruth(e["im"]["id"], e["im"].get("height", 0), e["im"].get("width", 0),
                   np.asarray(e["boxes"], np.float64).reshape(-1, 4), np.asarray(e["labels"], np.int64),
                   np.asarray(e["ignore"], np.float64).reshape(-1, 4), np.asarray(e["ignore_labels"], np.int64))
        for e in per_image.values()
    ]
    return truths, [names_by_id[i] for i in ids], index


def detections_from_coco(results: List[dict], index: Dict[int, int]) -> List[ImageDetections]:
    """Detections from a COCO results list, as for mAP: score >= 0.001, the best 100 per image;
    category ids mapped to class indices with ``index``."""
    grouped: Dict[int, list] = {}
    for r in results:
        if r["score"] >= SCORE_THRESHOLD:
            grouped.setdefault(r["image_id"], []).append(r)
    detections = []
    for image_id, rs in grouped.items():
        rs = sorted(rs, key=lambda r: -r["score"])[:MAX_DETECTIONS]
        detections.append(ImageDetections(
            image_id, xywh_to_xyxy(np.asarray([r["bbox"] for r in rs], np.float64)).reshape(-1, 4),
            np.asarray([r["score"] for r in rs], np.float64), np.asarray([index[r["category_id"]] for r in rs])))
    return detections


def predict_dataset(
    model, data, split: str = "val", batch_size: int = 8, letterbox: bool = True, predict=None,
    score_threshold: float = SCORE_THRESHOLD, max_detections: int = MAX_DETECTIONS, label_map=None,
    progress: bool = False, limit: Optional[int] = None, detect=None,
):
    """Run a model over a split of a converted dataset; detections and ground truth in image pixels.

    Args:
        model: a Keras detector (with ``predict``: any model object carrying the head metadata).
        data: the dataset folder or its manifest.
        split: the split to run.
        batch_size: images per batch.
        letterbox: place images as the model was trained to see them.
        predict: optional function images -> raw outputs (e.g. a TFLite interpreter); default the model.
        detect: instead of ``predict``, a function images -> detections of each image as
            :func:`~kprune.models.head.non_max_suppression` returns them (a post-processed TFLite
            file, :class:`~kprune.models.litert.DetectionRunner`).
        score_threshold, max_detections: kept detections per image (0.001 and 100 for mAP).
        label_map: the model label of each dataset label (a model that keeps its own classes).
        progress: show a progress bar.
        limit: only the first that many images of the split (all: None).

    Returns:
        (detections, truths): lists of :class:`ImageDetections` and :class:`ImageTruth`; image ids are
        positions in the split; ignore regions apply to any class.
    """
    from kprune._keras import tf  # TensorFlow: see the note at the imports
    from kprune.data.pipeline import make_dataset
    from kprune.data.tfrecord import Manifest, read_manifest
    from kprune.detectors.inference import decode_and_suppress
    from kprune.models.head import ImageTransform

    manifest = data if isinstance(data, Manifest) else read_manifest(data)
    size = model.input_shape[1]
    dataset = make_dataset(manifest, split, size, batch_size, letterbox=letterbox, with_meta=True, label_map=label_map)
    total = manifest.num_images(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit {limit}: evaluate at least one image")
        dataset, total = dataset.unbatch().take(limit).batch(batch_size), min(total, limit)
    if detect is None:
        if predict is None:
            predict = tf.function(lambda images: model(images, training=False))

        def detect(images):
            return decode_and_suppress(model, predict(images), score_threshold, 0.45, max_detections)
    elif predict is not None:
        raise ValueError("give predict (raw outputs) or detect (detections), not both")
    detections, truths = [], []
    with tqdm(total=total, desc=f"evaluate {split}", unit="img", disable=not progress) as bar:
        for images, meta in dataset:
            kept = detect(images)
            for k, (det_boxes, det_scores, det_labels) in enumerate(kept):
                hw = tuple(int(v) for v in meta["image_hw"][k].numpy())
                transform = ImageTransform(hw, (size, size), tuple(meta["scale_xy"][k].numpy().tolist()),
                                           tuple(meta["offset_xy"][k].numpy().tolist()))
                labels = meta["labels"][k].numpy()
                ignore = meta["ignore"][k].numpy()
                ignore = ignore[(ignore[:, 2] > ignore[:, 0]) & (ignore[:, 3] > ignore[:, 1])]
                image_id = len(truths)
                truths.append(ImageTruth(
                    image_id, hw[0], hw[1], transform.to_image(meta["boxes"][k].numpy()[labels >= 0]),
                    labels[labels >= 0].astype(np.int64), transform.to_image(ignore), np.full(len(ignore), -1, np.int64)))
                detections.append(ImageDetections(image_id, transform.to_image(det_boxes), det_scores, det_labels))
            bar.update(len(kept))
    return detections, truths


def tflite_predict(path: str, model) -> tuple:
    """How :func:`predict_dataset` runs a .tflite file with the LiteRT interpreter, image by image;
    ``model`` is the Keras model the file was converted from, for the metadata.

    Returns:
        (predict, detect, notes): for a file of raw outputs, ``predict`` (a
        :class:`kprune.models.litert.TFLiteRunner`) and ``detect`` None; for a post-processed file
        (decoding and NMS inside), ``detect`` (a :class:`kprune.models.litert.DetectionRunner`) and
        ``predict`` None, with ``notes`` on settings fixed in it that make its mAP differ from the
        model's (a score threshold above 0.001, fewer than 100 detections).

    Raises:
        ValueError: the file cannot be loaded, or its inputs / outputs do not match ``model``.
    """
    with open(path, "rb") as handle:
        content = handle.read()
    try:
        if detection_op_options(content) is None:
            return TFLiteRunner(content, model), None, []
        runner = DetectionRunner(content)
        if runner.input_size != tuple(model.input_shape[1:3]):
            raise ValueError(f"input {runner.input_size}, the Keras model has {tuple(model.input_shape[1:3])}")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    notes = []
    if runner.options["nms_score_threshold"] > SCORE_THRESHOLD * 1.0001:
        notes.append(f"exported with score threshold {runner.options['nms_score_threshold']:.3g}: detections below it "
                     f"are missing, the mAP is lower than at {SCORE_THRESHOLD}")
    if runner.options["max_detections"] < MAX_DETECTIONS:
        notes.append(f"exported with at most {runner.options['max_detections']} detections per image "
                     f"(mAP is computed on {MAX_DETECTIONS})")
    return None, runner, notes


def load_for_inference(path: str, keras_path: Optional[str] = None) -> tuple:
    """A ``.keras`` or ``.tflite`` model ready to run on images. A ``.tflite`` file needs the
    ``.keras`` model it came from for its head metadata: ``keras_path``, or the file of the same
    name with ``.keras``.

    Returns:
        (model, predict, detect, notes): the Keras model, and for a ``.tflite`` file what
        :func:`tflite_predict` returns (None, None, [] for a ``.keras`` file).

    Raises:
        ValueError: unknown file type, missing Keras model for a .tflite file, or a file that does
            not match its Keras model.
    """
    from kprune.models.io import load_model

    if path.endswith(".tflite"):
        keras_path = keras_path or path[: -len(".tflite")] + ".keras"
        if not os.path.isfile(keras_path):
            raise ValueError(f"{path}: a .tflite file needs the .keras model it was converted from for its head "
                             f"metadata; {keras_path} does not exist (give --keras)")
        model = load_model(keras_path)
        return (model, *tflite_predict(path, model))
    if path.endswith(".keras"):
        return load_model(path), None, None, []
    raise ValueError(f"{path}: expected a .keras or .tflite model")


def evaluate_model(path: str, data, split: str = "val", batch_size: int = 8, keras_path: Optional[str] = None,
                   letterbox: bool = True, progress: bool = False) -> dict:
    """mAP of a ``.keras`` or ``.tflite`` model on a split of a converted dataset (see
    :func:`evaluate_detections`); a ``.tflite`` file is read with the ``.keras`` model it came from
    (:func:`load_for_inference`).

    Classes are matched by name when the model stores names (a model that kept other classes is
    scored in its own classes, the dataset's mapped onto them); by index otherwise.

    Raises:
        ValueError: unknown file type, missing Keras model for a .tflite file, or classes that do not
            fit the dataset.
    """
    from kprune.data.tfrecord import Manifest, read_manifest  # TensorFlow: see the note at the imports

    manifest = data if isinstance(data, Manifest) else read_manifest(data)
    model, predict, detect, notes = load_for_inference(path, keras_path)
    result = evaluate_loaded(model, manifest, split, batch_size, letterbox, predict=predict, progress=progress,
                             source=path, detect=detect)
    result["model"] = path
    if notes:
        result["notes"] = notes
    return result


def evaluate_loaded(model, data, split: str = "val", batch_size: int = 8, letterbox: bool = True, predict=None,
                    progress: bool = False, limit: Optional[int] = None, source: Optional[str] = None,
                    detect=None) -> dict:
    """mAP of a Keras detector already in memory (see :func:`evaluate_model`); ``limit``: only the
    first that many images of the split; ``source``: the model's file, for messages.

    Raises:
        ValueError: classes that do not fit the dataset.
    """
    from kprune.data.tfrecord import Manifest, read_manifest  # TensorFlow: see the note at the imports
    from kprune.detectors import family_of
    from kprune.models.head import class_mapping

    manifest = data if isinstance(data, Manifest) else read_manifest(data)
    family = family_of(model)
    model_names, classes = family.class_names(model), family.num_classes(model)
    names, label_map = manifest.classes, None
    if model_names and list(model_names) != list(manifest.classes):
        # a model that kept other classes (head-mode retraining): score in its classes, by name
        label_map, names = class_mapping(manifest.classes, model_names, {}), list(model_names)
    elif classes != len(manifest.classes):
        raise ValueError(f"{source or 'model ' + model.name} has {classes} unnamed classes, the dataset {len(manifest.classes)} "
                         f"({', '.join(manifest.classes)})")
    detections, truths = predict_dataset(model, manifest, split, batch_size, letterbox=letterbox, predict=predict,
                                         label_map=label_map, progress=progress, limit=limit, detect=detect)
    result = evaluate_detections(detections, truths, names)
    result["split"] = split
    return result


def report_table(result: dict) -> str:
    """The per-class table users compare with published ones, then the mAP lines."""
    lines = [f"{'class':16} {'AP50':>7} {'AP50-11pt':>10} {'recall':>7} {'objects':>8} {'detections':>11}"]
    for name, row in result["per_class"].items():
        lines.append(f"{name:16} {row['ap']:7.4f} {row['ap_11pt']:10.4f} {row['recall']:7.4f} "
                     f"{row['ground_truth']:8d} {row['detections']:11d}")
    lines.append(f"mAP@0.5 (VOC all-point) {result['map50']:.4f}   11-point {result['map50_11pt']:.4f}")
    lines.append(f"COCO mAP@[.5:.95] {result['coco_map']:.4f}   AP50 {result['coco_ap50']:.4f}   "
                 f"AP75 {result['coco_ap75']:.4f}   ({result['images']} images)")
    return "\n".join(lines)


def evaluate_files(detections_path: str, ground_truth_path: str) -> dict:
    """Score COCO-format detections against COCO-format ground truth (category ids 0..K-1).

    Raises:
        ValueError: a file is missing or not the expected JSON, or refers to unknown images.
    """
    def load(path, kind):
        if not os.path.isfile(path):
            raise ValueError(f"{kind} file {path} does not exist")
        try:
            return json.loads(open(path, "rb").read())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None

    ground_truth = load(ground_truth_path, "ground-truth")
    results = load(detections_path, "detections")
    if not isinstance(ground_truth, dict) or not all(k in ground_truth for k in ("images", "annotations", "categories")):
        raise ValueError(f"{ground_truth_path}: expected a COCO instances dict (images, annotations, categories)")
    if not isinstance(results, list):
        raise ValueError(f"{detections_path}: expected a list of COCO results (image_id, category_id, bbox, score)")
    try:
        truths, names, index = truths_from_coco(ground_truth)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{ground_truth_path}: malformed COCO instances ({type(error).__name__}: {error})") from None
    known = {t.image_id for t in truths}
    try:
        strangers = sorted({r["image_id"] for r in results} - known)
        unknown = sorted({r["category_id"] for r in results} - set(index))
        if strangers:
            raise ValueError(f"{detections_path}: detections for images {strangers[:5]} that {ground_truth_path} lacks")
        if unknown:
            raise ValueError(f"{detections_path}: category ids {unknown[:5]} are not in {ground_truth_path}")
        detections = detections_from_coco(results, index)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{detections_path}: malformed COCO results ({type(error).__name__}: {error}); "
                         "expected image_id, category_id, bbox and score") from None
    result = evaluate_detections(detections, truths, names)  # pycocotools sees the same detections
    result["detections_file"], result["ground_truth_file"] = detections_path, ground_truth_path
    return result
