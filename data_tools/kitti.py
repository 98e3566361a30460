"""KITTI object detection (official ``training/image_2`` + ``training/label_2`` layout) to records.

Label files hold one object per line with 15 fields (a 16th, the score, only in results):
type, truncated, occluded, alpha, left, top, right, bottom, h, w, l, x, y, z, rotation_y.
``DontCare`` boxes become ignore regions; types outside the chosen classes (after ``--map``) are
left out and counted. KITTI has no official validation split, so the training images are split
deterministically by seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_tools import classes as defaults
from data_tools.convert import Record, require_dir, unknown_classes_error

DEFAULT_CLASSES = defaults.KITTI
DEFAULT_VAL_FRACTION = 0.2
KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Label fields detection does not need; none of them reaches the TFRecords.
DROPPED_FIELDS = ("truncated", "occluded", "alpha", "dimensions", "location", "rotation_y", "score")


def parse_label_file(path: Path) -> List[Tuple[str, tuple]]:
    """(type, pixel box) of every line of one label file.

    Raises:
        ValueError: a line without 15 (or 16) fields or with a non-numeric box, naming file and line.
    """
    objects = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise ValueError(f"{path}:{number}: {len(fields)} fields, a KITTI label line has 15")
        try:
            box = tuple(float(v) for v in fields[4:8])
        except ValueError:
            raise ValueError(f"{path}:{number}: box {' '.join(fields[4:8])!r} is not four numbers") from None
        objects.append((fields[0], box))
    return objects


def parse_mapping(pairs: Sequence[str], classes: Sequence[str]) -> Dict[str, str]:
    """``["Person_sitting=Pedestrian"]`` -> ``{"Person_sitting": "Pedestrian"}``; targets must be classes."""
    mapping = {}
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise ValueError(f"--map {pair!r}: expected SOURCE=CLASS, e.g. Person_sitting=Pedestrian")
        if target not in classes:
            raise ValueError(f"--map {pair!r}: {target!r} is not one of the classes {', '.join(classes)}")
        if source == "DontCare":
            raise ValueError(f"--map {pair!r}: DontCare boxes are regions to ignore, never objects")
        mapping[source] = target
    return mapping


def split_ids(ids: Sequence[str], val_fraction: Optional[float], train: Optional[int], val: Optional[int], seed: int):
    """Deterministic train/val split of the sorted image ids."""
    ids = sorted(ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if train is not None or val is not None:
        if val_fraction is not None:
            raise ValueError("give --val-fraction or --train and --val, not both")
        if train is None or val is None or train < 1 or val < 1:
            raise ValueError(f"--train and --val go together and must be >= 1, got {train} and {val}")
        if train + val > len(ids):
            raise ValueError(f"--train {train} + --val {val} is more than the {len(ids)} labelled images")
        return sorted(order[:train]), sorted(order[train:train + val])
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    num_val = max(1, int(round(len(ids) * val_fraction)))
    if num_val >= len(ids):
        raise ValueError(f"{len(ids)} labelled images are too few to split with --val-fraction {val_fraction}")
    return sorted(order[num_val:]), sorted(order[:num_val])


def kitti_records(
    kitti_dir: str | Path,
    classes: Sequence[str],
    mapping: Dict[str, str],
    val_fraction: Optional[float] = None,
    train: Optional[int] = None,
    val: Optional[int] = None,
    seed: int = 0,
) -> Tuple[Dict[str, List[Record]], int, Dict[str, int]]:
    """Records of the train and val splits, the bytes of the label files, and the objects left out
    per type.

    Raises:
        ValueError: a folder of the official layout is missing, a class or ``--map`` source names no
            type found in the labels (the message lists the types that exist), or a label line is bad.
    """
    root = Path(kitti_dir)
    label_dir = require_dir(root / "training" / "label_2", "KITTI labels (official layout: training/label_2/*.txt)")
    image_dir = require_dir(root / "training" / "image_2", "KITTI images (official layout: training/image_2/*.png)")
    label_files = sorted(label_dir.glob("*.txt"))
    if not label_files:
        raise ValueError(f"{label_dir}: no label files (*.txt)")
    if "DontCare" in classes:
        raise ValueError("DontCare cannot be a class: its boxes are regions to ignore, never objects")
    labels = {path.stem: parse_label_file(path) for path in label_files}
    types = sorted({t for objects in labels.values() for t, _ in objects} | set(KITTI_TYPES))
    unknown = [name for name in list(classes) + list(mapping) if name not in types]
    if unknown:
        raise unknown_classes_error(unknown, types, str(label_dir))
    label_of = {name: i for i, name in enumerate(classes)}
    label_of.update({source: label_of[target] for source, target in mapping.items()})

    left_out: Dict[str, int] = {}
    images = {path.stem: path for path in image_dir.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES}
    train_ids, val_ids = split_ids(list(labels), val_fraction, train, val, seed)
    records = {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        records[split] = []
        for stem in ids:
            objects, ignore = [], []
            for kind, box in labels[stem]:
                if kind == "DontCare":
                    ignore.append((box, "DontCare"))
                elif kind in label_of:
                    objects.append((box, label_of[kind]))
                else:
                    left_out[kind] = left_out.get(kind, 0) + 1
            path = images.get(stem, image_dir / f"{stem}.png")  # a missing image is skipped and listed
            records[split].append(Record(path, path.name, stem, objects, ignore))
    return records, sum(p.stat().st_size for p in label_files), left_out
