"""PASCAL VOC (``VOCdevkit/VOC{year}``: Annotations, JPEGImages, ImageSets/Main) to records.

VOC boxes are 1-based inclusive pixel indices; they become continuous coordinates
(x_min - 1, y_min - 1, x_max, y_max). Objects marked ``difficult`` become ignore regions, as the VOC
evaluation treats them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from data_tools import classes as defaults
from data_tools.convert import Record, check_relative_name, require_dir, require_file, unknown_classes_error

DEFAULT_CLASSES = defaults.VOC
SPLITS = ("train", "val")
# Annotation fields detection does not need; none of them reaches the TFRecords.
DROPPED_FIELDS = ("folder", "source", "owner", "segmented", "pose", "truncated", "part")


def year_dir(voc_dir: str | Path, year: int) -> Path:
    """``voc_dir/VOC{year}`` (voc_dir is VOCdevkit) or ``voc_dir`` itself if it is that folder."""
    root = Path(voc_dir)
    return root if (root / "Annotations").is_dir() else root / f"VOC{year}"


def parse_annotation(path: Path) -> List[Tuple[str, tuple, bool]]:
    """(name, continuous pixel box, difficult) of every object in one VOC XML file.

    Raises:
        ValueError: the XML is malformed or an object lacks a numeric bndbox, naming the file.
    """
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: not valid XML ({error})") from None
    objects = []
    for number, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: object {number} ({name!r}) has no numeric bndbox xmin/ymin/xmax/ymax") from None
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, (xmin - 1.0, ymin - 1.0, xmax, ymax), difficult))
    return objects


def voc_records(voc_dir: str | Path, year: int, classes: Sequence[str]) -> Tuple[Dict[str, List[Record]], int]:
    """Records of the train and val splits (ImageSets/Main/train.txt and val.txt) and the bytes of
    the annotation files read.

    Raises:
        ValueError: a file or folder of the layout is missing, an id is unsafe, or a class does not
            exist (the message lists the classes found).
    """
    root = year_dir(voc_dir, year)
    annotations = require_dir(root / "Annotations", f"VOC annotations (layout: VOCdevkit/VOC{year}/Annotations)")
    images = require_dir(root / "JPEGImages", f"VOC images (layout: VOCdevkit/VOC{year}/JPEGImages)")
    parsed, ids = {}, {}
    for split in SPLITS:
        listing = require_file(root / "ImageSets" / "Main" / f"{split}.txt", f"VOC {split} image list")
        ids[split] = [check_relative_name(line.split()[0], str(listing)) for line in listing.read_text().splitlines()
                      if line.strip()]
        for image_id in ids[split]:
            xml = require_file(annotations / f"{image_id}.xml", f"VOC annotation of image {image_id}")
            parsed[image_id] = parse_annotation(xml)
    names = sorted({name for objects in parsed.values() for name, _, _ in objects} | set(DEFAULT_CLASSES))
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise unknown_classes_error(unknown, names, str(annotations))
    label_of = {name: i for i, name in enumerate(classes)}
    records = {}
    for split in SPLITS:
        records[split] = []
        for image_id in ids[split]:
            chosen = [(name, box, difficult) for name, box, difficult in parsed[image_id] if name in label_of]
            objects = [(box, label_of[name]) for name, box, difficult in chosen if not difficult]
            if not objects:
                continue
            ignore = [(box, "difficult") for name, box, difficult in chosen if difficult]
            records[split].append(Record(images / f"{image_id}.jpg", f"{image_id}.jpg", image_id, objects, ignore))
    nbytes = sum((annotations / f"{image_id}.xml").stat().st_size for image_id in parsed)
    return records, nbytes
