"""PASCAL VOC (``VOCdevkit/VOC{year}``: Annotations, JPEGImages, ImageSets/Main) to records.

A split is made of image sets, each written ``YEAR:NAME`` for the list
``VOCdevkit/VOC{YEAR}/ImageSets/Main/{NAME}.txt``: the classic VOC07+12 training split is
``2007:trainval,2012:trainval`` and its test split ``2007:test``. When the sets of a conversion come
from more than one year, source ids and file names carry the year (``2007_000005``,
``2007_000005.jpg``) so that they stay unique; with one year they are the VOC ids themselves.

VOC boxes are 1-based inclusive pixel indices; they become continuous coordinates
(x_min - 1, y_min - 1, x_max, y_max). Objects marked ``difficult`` become ignore regions, as the VOC
evaluation treats them.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from data_tools import classes as defaults
from data_tools.convert import Record, check_relative_name, require_dir, require_file, unknown_classes_error

DEFAULT_CLASSES = defaults.VOC
DEFAULT_YEAR = 2007
# Annotation fields detection does not need; none of them reaches the TFRecords.
DROPPED_FIELDS = ("folder", "source", "owner", "segmented", "pose", "truncated", "part")

ImageSet = Tuple[int, str]  # (year, name of the list in ImageSets/Main)
_IMAGE_SET = re.compile(r"(\d{4}):([A-Za-z0-9][A-Za-z0-9_-]*)")


def year_dir(voc_dir: str | Path, year: int) -> Path:
    """``voc_dir/VOC{year}`` (voc_dir is VOCdevkit) or ``voc_dir`` itself if it is that folder."""
    root = Path(voc_dir)
    return root if (root / "Annotations").is_dir() else root / f"VOC{year}"


def format_image_set(image_set: ImageSet) -> str:
    return f"{image_set[0]}:{image_set[1]}"


def parse_image_sets(text: str, option: str = "image sets") -> List[ImageSet]:
    """``"2007:trainval,2012:trainval"`` -> ``[(2007, "trainval"), (2012, "trainval")]``.

    Raises:
        ValueError: an entry is not YEAR:NAME (four-digit year, a list name of letters, digits, ``_``
            and ``-``) or an entry is repeated, naming the entry and ``option``.
    """
    sets = []
    for entry in text.split(","):
        match = _IMAGE_SET.fullmatch(entry.strip())
        if not match:
            raise ValueError(f"{option}: entry {entry.strip()!r} is not YEAR:NAME, e.g. 2007:trainval for "
                             f"VOCdevkit/VOC2007/ImageSets/Main/trainval.txt")
        image_set = (int(match.group(1)), match.group(2))
        if image_set in sets:
            raise ValueError(f"{option}: entry {format_image_set(image_set)!r} is given twice")
        sets.append(image_set)
    return sets


def split_image_sets(year: Optional[int] = None, train: Optional[str] = None,
                     val: Optional[str] = None) -> Dict[str, List[ImageSet]]:
    """The image sets of each split, from ``--year`` or from ``--train`` and ``--val``.

    ``year`` alone is short for ``train=f"{year}:train", val=f"{year}:val"``; nothing at all means
    year :data:`DEFAULT_YEAR`.

    Raises:
        ValueError: ``year`` given together with ``train`` or ``val``, only one of ``train`` and
            ``val`` given, or an entry is malformed (see :func:`parse_image_sets`).
    """
    if year is not None and (train is not None or val is not None):
        raise ValueError(f"--year {year} is short for --train {year}:train --val {year}:val; give either --year "
                         f"or --train and --val, not both")
    if train is None and val is None:
        year = DEFAULT_YEAR if year is None else year
        return {"train": [(year, "train")], "val": [(year, "val")]}
    if train is None or val is None:
        given, missing = ("val", "train") if train is None else ("train", "val")
        raise ValueError(f"--{given} is given without --{missing}: give both, e.g. "
                         f"--train 2007:trainval,2012:trainval --val 2007:test")
    return {"train": parse_image_sets(train, "--train"), "val": parse_image_sets(val, "--val")}


def image_set_options(splits: Dict[str, Sequence[ImageSet]]) -> dict:
    """What dataset.json records of the image sets: the YEAR:NAME entries of each split and whether
    source ids and file names carry the year."""
    years = {year for sets in splits.values() for year, _ in sets}
    return {"image_sets": {split: [format_image_set(s) for s in sets] for split, sets in splits.items()},
            "ids_prefixed_with_year": len(years) > 1}


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


def _year_folder(voc_dir: Path, year: int, image_set: str, years: Sequence[int]) -> Path:
    """The VOC{year} folder an image set reads, refusing a layout that cannot hold it."""
    if (voc_dir / "Annotations").is_dir() and len(years) > 1:
        raise ValueError(f"image set {image_set!r}: --voc-dir {voc_dir} is one year's folder (it has Annotations/); "
                         f"to combine the years {', '.join(map(str, years))} give the VOCdevkit folder that holds "
                         f"{', '.join(f'VOC{y}/' for y in years)}")
    root = year_dir(voc_dir, year)
    if not root.is_dir():
        raise ValueError(f"image set {image_set!r}: missing the VOC{year} folder, expected {root} "
                         f"(VOCdevkit/VOC{year} with Annotations/, JPEGImages/ and ImageSets/Main/)")
    return root


def voc_records(voc_dir: str | Path, year: int, classes: Sequence[str]) -> Tuple[Dict[str, List[Record]], int]:
    """Records of the train and val splits of one year (ImageSets/Main/train.txt and val.txt) and the
    bytes of the annotation files read: :func:`image_set_records` of ``{year}:train`` and ``{year}:val``."""
    return image_set_records(voc_dir, split_image_sets(year), classes)


def image_set_records(voc_dir: str | Path, splits: Dict[str, Sequence[ImageSet]],
                      classes: Sequence[str]) -> Tuple[Dict[str, List[Record]], int]:
    """Records of each split, the images of its image sets one after the other in the order given,
    and the bytes of the annotation files read.

    Source ids and file names are the VOC ids if all image sets are of one year, else prefixed with
    the year (``2007_000005``, ``2007_000005.jpg``).

    Raises:
        ValueError: a year folder, list file, annotation or image folder of the layout is missing
            (naming the image set and the path expected), an id is unsafe, an image is listed twice
            (within a split or across splits), or a class does not exist (the message lists the
            classes found).
    """
    voc_dir = Path(voc_dir)
    years = sorted({year for sets in splits.values() for year, _ in sets})
    prefixed = len(years) > 1
    parsed, entries, listed_by, folders = {}, {}, {}, {}
    for split, sets in splits.items():
        entries[split] = []
        for year, name in sets:
            image_set = format_image_set((year, name))
            if not _IMAGE_SET.fullmatch(image_set):
                raise ValueError(f"split {split!r}: image set {image_set!r} is not YEAR:NAME")
            if year not in folders:
                root = _year_folder(voc_dir, year, image_set, years)
                folders[year] = (
                    root,
                    require_dir(root / "Annotations", f"VOC annotations (layout: VOCdevkit/VOC{year}/Annotations)"),
                    require_dir(root / "JPEGImages", f"VOC images (layout: VOCdevkit/VOC{year}/JPEGImages)"),
                )
            root, annotations, images = folders[year]
            listing = require_file(root / "ImageSets" / "Main" / f"{name}.txt", f"image list of {image_set!r}")
            for line in listing.read_text().splitlines():
                if not line.strip():
                    continue
                image_id = check_relative_name(line.split()[0], str(listing))
                source_id = f"{year}_{image_id}" if prefixed else image_id
                if source_id in listed_by:
                    raise ValueError(f"image {source_id} is listed by {listed_by[source_id]} and by {image_set} "
                                     f"({split}): an image may be listed only once, in one split")
                listed_by[source_id] = f"{image_set} ({split})"
                xml = require_file(annotations / f"{image_id}.xml", f"VOC annotation of image {image_id}")
                parsed[source_id] = (xml, images / f"{image_id}.jpg", parse_annotation(xml))
                entries[split].append(source_id)
    names = sorted({name for _, _, objects in parsed.values() for name, _, _ in objects} | set(DEFAULT_CLASSES))
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise unknown_classes_error(unknown, names, ", ".join(str(a) for _, a, _ in folders.values()))
    label_of = {name: i for i, name in enumerate(classes)}
    records = {}
    for split, source_ids in entries.items():
        records[split] = []
        for source_id in source_ids:
            _, image, objects_found = parsed[source_id]
            chosen = [(name, box, difficult) for name, box, difficult in objects_found if name in label_of]
            objects = [(box, label_of[name]) for name, box, difficult in chosen if not difficult]
            if not objects:
                continue
            ignore = [(box, "difficult") for name, box, difficult in chosen if difficult]
            records[split].append(Record(image, f"{source_id}.jpg", source_id, objects, ignore))
    nbytes = sum(xml.stat().st_size for xml, _, _ in parsed.values())
    return records, nbytes
