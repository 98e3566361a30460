"""COCO (official ``annotations/instances_{split}{year}.json`` layout) to records of a class subset.

Only images with at least one (non-crowd) object of the chosen classes are kept, plus, when asked,
a fixed number of images without any, drawn deterministically. Crowd boxes of the chosen classes
become ignore regions. Labels are 0..K-1 in the order the classes are given (the TFRecords store
them 1-based, :mod:`kprune.data.tfrecord`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from data_tools import classes as defaults
from data_tools.convert import (
    Record,
    check_relative_name,
    require_dir,
    require_file,
    unknown_classes_error,
)

DEFAULT_CLASSES = defaults.COCO5
SPLITS = ("train", "val")
# Fields of the official files that detection does not need; none of them reaches the TFRecords.
DROPPED_FIELDS = (
    "info", "licenses", "images.license", "images.coco_url", "images.flickr_url", "images.date_captured",
    "annotations.segmentation", "annotations.area", "annotations.keypoints", "annotations.num_keypoints",
)


def annotation_path(coco_dir: Path, split: str, year: int) -> Path:
    return Path(coco_dir) / "annotations" / f"instances_{split}{year}.json"


def load_annotations(path: Path) -> dict:
    """Read one instances file.

    Raises:
        ValueError: the file is missing, not JSON, or lacks images / annotations / categories.
    """
    require_file(path, "COCO annotation file (official layout: annotations/instances_train2017.json)")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file (no list {', '.join(repr(m) for m in missing)})")
    return data


def category_names(data: dict, path: Path) -> List[str]:
    """Every category name of an instances file, in id order."""
    try:
        return [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: a category is malformed; expected id and name") from None


def split_records(
    data: dict, path: Path, image_dir: Path, classes: Sequence[str], keep_negatives: int, seed: int
) -> List[Record]:
    """Records of one split: images with objects of ``classes`` (plus ``keep_negatives`` without)."""
    try:
        ids_by_name = {c["name"]: c["id"] for c in data["categories"]}
    except (KeyError, TypeError):
        raise ValueError(f"{path}: a category is malformed; expected id and name") from None
    unknown = [name for name in classes if name not in ids_by_name]
    if unknown:
        raise unknown_classes_error(unknown, sorted(ids_by_name), str(path))
    label_of = {ids_by_name[name]: label for label, name in enumerate(classes)}

    objects: Dict[int, List[Tuple[tuple, int]]] = {}
    crowds: Dict[int, List[Tuple[tuple, str]]] = {}
    for number, ann in enumerate(data["annotations"]):
        try:
            label = label_of.get(ann["category_id"])
            if label is None:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            image_id = ann["image_id"]
        except (KeyError, TypeError, ValueError) as error:
            what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"{path}: annotation {ann.get('id', f'#{number}') if isinstance(ann, dict) else f'#{number}'} "
                             f"is malformed ({what}); expected category_id, image_id and bbox [x, y, w, h]") from None
        box = (x, y, x + w, y + h)
        if ann.get("iscrowd", 0):
            crowds.setdefault(image_id, []).append((box, "crowd"))
        else:
            objects.setdefault(image_id, []).append((box, label))

    for number, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{path}: image #{number} is malformed; expected id and file_name")
    images = sorted(data["images"], key=lambda im: im["id"])
    chosen = [im for im in images if im["id"] in objects]
    if keep_negatives > 0:
        negatives = [im for im in images if im["id"] not in objects]
        picks = np.random.default_rng(seed).permutation(len(negatives))[:keep_negatives]
        chosen = sorted(chosen + [negatives[i] for i in picks], key=lambda im: im["id"])
    return [
        Record(
            image_path=image_dir / check_relative_name(im["file_name"], str(path)),
            filename=im["file_name"],
            source_id=str(im["id"]),
            objects=objects.get(im["id"], []),
            ignore=crowds.get(im["id"], []),
        )
        for im in chosen
    ]


def coco_records(
    coco_dir: str | Path, year: int, classes: Sequence[str] | None, keep_negatives: int = 0, seed: int = 0
) -> Tuple[Dict[str, List[Record]], List[str], int]:
    """Records of the train and val splits, the class names, and the bytes of the annotation files read.

    ``classes`` None means every category of the train file, in id order.

    Raises:
        ValueError: a file or folder of the official layout is missing, a class does not exist (the
            message lists those that do), or a file name is absolute or contains ``..``.
    """
    coco_dir = Path(coco_dir)
    if keep_negatives < 0:
        raise ValueError(f"--keep-negatives must be >= 0, got {keep_negatives}")
    paths = {split: annotation_path(coco_dir, split, year) for split in SPLITS}
    for path in paths.values():  # check the whole layout before the long reads
        require_file(path, "COCO annotation file (official layout: annotations/instances_train2017.json)")
    records = {}
    for split, path in paths.items():
        image_dir = require_dir(coco_dir / f"{split}{year}", f"COCO {split} images")
        data = load_annotations(path)
        classes = category_names(data, path) if classes is None else list(classes)
        records[split] = split_records(data, path, image_dir, classes, keep_negatives, seed)
    return records, classes, sum(p.stat().st_size for p in paths.values())
