"""What every converter shares: images checked and stripped of metadata, boxes clipped, shards and
the manifest written so that a killed run leaves nothing under a final name.

A source-specific converter (COCO, KITTI, VOC) only turns its annotation files into
:class:`Record` lists per split; :func:`write_dataset` does the rest.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from data_tools.jpeg import JpegError, strip_metadata
from kprune._keras import tf
from kprune.data import tfrecord
from kprune.fileio import write_json_atomic

Box = Tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in pixels, continuous coordinates

JPEG_QUALITY = 95  # for images that are not JPEG already and must be re-encoded
IMAGES_PER_SHARD = 1000


@dataclass
class Record:
    """One image of the source and its annotations, before any file is read.

    ``objects`` pairs a pixel box with a label in 0..K-1; ``ignore`` pairs a pixel box with the
    reason it is to be ignored (``crowd``, ``DontCare``, ``difficult``).
    """

    image_path: Path
    filename: str
    source_id: str
    objects: List[Tuple[Box, int]] = field(default_factory=list)
    ignore: List[Tuple[Box, str]] = field(default_factory=list)


class CorruptImage(ValueError):
    """An image that cannot be stored: unreadable, truncated or not decodable."""


def check_relative_name(name: str, where: str) -> str:
    """Refuse a file name that is absolute or climbs out of its folder with ``..``.

    Raises:
        ValueError: naming ``where`` (the annotation file) and the offending name.
    """
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts:
        raise ValueError(f"{where}: image file name {name!r} is rejected: it must be a relative path without '..'")
    return name


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise ValueError naming the path expected."""
    if not path.is_file():
        raise ValueError(f"missing {what}: expected {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise ValueError naming the path expected."""
    if not path.is_dir():
        raise ValueError(f"missing {what}: expected the folder {path}")
    return path


def parse_classes(text: str | Sequence[str]) -> List[str]:
    """``"a,b,c"`` (or a list) -> ``["a", "b", "c"]``, refusing empty or repeated names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    if not names or any(not n for n in names):
        raise ValueError(f"class list {text!r} has an empty name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class list {text!r} repeats {', '.join(repeated)}")
    return names


def unknown_classes_error(unknown: Sequence[str], available: Sequence[str], source: str) -> ValueError:
    return ValueError(
        f"{source}: no class named {', '.join(repr(u) for u in unknown)}; classes that exist: {', '.join(available)}"
    )


def prepare_image(data: bytes) -> Tuple[bytes, int, int, int]:
    """Bytes to store for one image file.

    JPEG files lose their metadata segments losslessly (no re-encode); other formats are decoded and
    re-encoded as JPEG. Either way the result is decoded with TensorFlow's decoder, the one the input
    pipeline uses, so a stored image always decodes.

    Returns:
        (JPEG bytes, height, width, metadata bytes removed).

    Raises:
        CorruptImage: the file is truncated or cannot be decoded.
    """
    import cv2

    removed = 0
    if data[:2] == b"\xff\xd8":
        try:
            encoded = strip_metadata(data)
        except JpegError as error:
            raise CorruptImage(str(error)) from None
        removed = len(data) - len(encoded)
    else:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if pixels is None:
            raise CorruptImage("cannot be decoded (truncated, or not an image format OpenCV reads)")
        ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise CorruptImage("could not be re-encoded as JPEG")
        encoded = buffer.tobytes()
    try:
        shape = tf.io.decode_jpeg(encoded, channels=3).shape
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
        raise CorruptImage(f"TensorFlow cannot decode it: {error.message.splitlines()[0]}") from None
    return encoded, int(shape[0]), int(shape[1]), removed


@dataclass
class SplitStats:
    classes: Sequence[str]
    images: int = 0
    objects: int = 0
    ignore_regions: int = 0
    negatives: int = 0
    boxes_clipped: int = 0
    boxes_dropped: int = 0
    ignore_dropped: int = 0
    max_objects: int = 0
    max_ignore: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    metadata_removed: int = 0
    reencoded: int = 0
    skipped: List[Dict[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.objects_per_class = {name: 0 for name in self.classes}
        self.images_per_class = {name: 0 for name in self.classes}

    def as_dict(self, files: List[str]) -> dict:
        return {
            "files": files,
            "images": self.images,
            "objects": self.objects,
            "objects_per_class": self.objects_per_class,
            "images_per_class": self.images_per_class,
            "ignore_regions": self.ignore_regions,
            "negatives": self.negatives,
            "boxes_clipped": self.boxes_clipped,
            "boxes_dropped": self.boxes_dropped,
            "ignore_regions_dropped": self.ignore_dropped,
            "max_objects_per_image": self.max_objects,
            "max_ignore_per_image": self.max_ignore,
            "bytes": {
                "images_before": self.bytes_before,
                "images_after": self.bytes_after,
                "metadata_removed": self.metadata_removed,
                "reencoded_images": self.reencoded,
            },
            "skipped": self.skipped,
        }


def _clip(box: Box, width: int, height: int) -> Tuple[Optional[Box], bool]:
    """Clip a pixel box to the image; returns (box or None if nothing is left, whether it was clipped)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        return None, True
    return clipped, clipped != (x0, y0, x1, y1)


def _normalised(boxes: List[Box], width: int, height: int) -> np.ndarray:
    array = np.asarray(boxes, np.float64).reshape(-1, 4) / np.array([width, height, width, height])
    return array.astype(np.float32)


def _process(record: Record, classes: Sequence[str]):
    """Read, check and encode one record; returns (Sample, counters) or (None, reason)."""
    try:
        data = record.image_path.read_bytes()
    except FileNotFoundError:
        return None, "image file missing", 0
    except OSError as error:
        return None, f"cannot read: {error.strerror}", 0
    try:
        encoded, height, width, removed = prepare_image(data)
    except CorruptImage as error:
        return None, str(error), len(data)
    counts = {"clipped": 0, "dropped": 0, "ignore_dropped": 0, "removed": removed,
              "reencoded": int(data[:2] != b"\xff\xd8")}
    boxes, labels, ignore, reasons = [], [], [], []
    for box, label in record.objects:
        kept, was_clipped = _clip(box, width, height)
        counts["clipped"] += int(was_clipped and kept is not None)
        if kept is None:
            counts["dropped"] += 1
            continue
        boxes.append(kept)
        labels.append(label)
    for box, reason in record.ignore:
        kept, _ = _clip(box, width, height)
        if kept is None:
            counts["ignore_dropped"] += 1
            continue
        ignore.append(kept)
        reasons.append(reason)
    sample = tfrecord.Sample(
        filename=record.filename,
        source_id=record.source_id,
        encoded=encoded,
        height=height,
        width=width,
        boxes=_normalised(boxes, width, height),
        labels=np.asarray(labels, np.int64),
        texts=[classes[label] for label in labels],
        ignore=_normalised(ignore, width, height),
        ignore_texts=reasons,
    )
    return sample, counts, len(data)


def write_dataset(
    splits: Dict[str, List[Record]],
    classes: Sequence[str],
    out: str | os.PathLike,
    source: dict,
    options: dict,
    dropped_fields: Sequence[str] = (),
    annotation_bytes: int = 0,
    images_per_shard: int = IMAGES_PER_SHARD,
    workers: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Write the records as sharded TFRecords plus ``dataset.json`` in ``out``.

    Corrupt or unreadable images are skipped and listed in the manifest. Boxes are clipped to their
    image; boxes with nothing left are dropped and counted. All shards of all splits are written
    under partial names; only when every split succeeded is the old manifest removed, the shards
    renamed and the new manifest written, then shards of earlier conversions it no longer lists are
    removed. A kill before that leaves an earlier dataset as it was; a kill during it (a few renames)
    leaves no manifest, so no reader takes the folder for a dataset.

    Returns:
        the manifest (also written to ``out/dataset.json``).

    Raises:
        ValueError: a split has no images (before or after skipping corrupt ones) or no objects.
    """
    out = Path(out)
    for split, records in splits.items():
        if not records:
            raise ValueError(f"split {split!r} has no images with objects of the classes {', '.join(classes)}")
    out.mkdir(parents=True, exist_ok=True)
    tfrecord.remove_partial_files(out)  # left by a killed conversion
    workers = workers or min(8, os.cpu_count() or 1)
    results = {}
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(workers))
        writers = {}
        for split, records in splits.items():
            writer = stack.enter_context(
                tfrecord.ShardWriter(out, split, max(1, math.ceil(len(records) / images_per_shard)))
            )
            stats = SplitStats(classes)
            bar = tqdm(total=len(records), desc=f"{split}", unit="img", disable=not progress, file=sys.stderr)
            for record, (sample, outcome, nbytes) in zip(records, pool.map(lambda r: _process(r, classes), records)):
                bar.update(1)
                if sample is None:
                    stats.skipped.append({"file": record.filename, "reason": outcome})
                    continue
                writer.write(tfrecord.serialize_sample(sample))
                _count(stats, sample, outcome, nbytes, classes)
            bar.close()
            if stats.images == 0:
                raise ValueError(f"split {split!r}: all {len(records)} images were skipped; first: {stats.skipped[0]}")
            if stats.objects == 0:
                raise ValueError(f"split {split!r} has no objects of the classes {', '.join(classes)}")
            writers[split], results[split] = writer, stats
        # The manifest goes first, so that a kill while shards are renamed over an earlier dataset's
        # cannot leave that dataset's manifest describing the new shards: no manifest, no dataset.
        (out / tfrecord.MANIFEST).unlink(missing_ok=True)
        files = {split: writer.commit() for split, writer in writers.items()}
    manifest = {
        "format": tfrecord.FORMAT,
        "version": tfrecord.VERSION,
        "classes": list(classes),
        "label_offset": tfrecord.LABEL_OFFSET,
        "source": source,
        "options": options,
        "splits": {split: results[split].as_dict(files[split]) for split in splits},
        "bytes": _bytes_summary(results.values(), annotation_bytes, out, files),
        "dropped_fields": list(dropped_fields),
    }
    write_json_atomic(out / tfrecord.MANIFEST, manifest)
    tfrecord.remove_stale_shards(out, keep=[name for names in files.values() for name in names])
    return manifest


def _count(stats: SplitStats, sample: tfrecord.Sample, counts: dict, nbytes: int, classes: Sequence[str]) -> None:
    stats.images += 1
    stats.objects += len(sample.labels)
    stats.ignore_regions += len(sample.ignore)
    stats.negatives += int(len(sample.labels) == 0)
    stats.boxes_clipped += counts["clipped"]
    stats.boxes_dropped += counts["dropped"]
    stats.ignore_dropped += counts["ignore_dropped"]
    stats.max_objects = max(stats.max_objects, len(sample.labels))
    stats.max_ignore = max(stats.max_ignore, len(sample.ignore))
    stats.metadata_removed += counts["removed"]
    stats.reencoded += counts["reencoded"]
    stats.bytes_before += nbytes
    stats.bytes_after += len(sample.encoded)
    for label in sample.labels:
        stats.objects_per_class[classes[label]] += 1
    for label in set(sample.labels.tolist()):
        stats.images_per_class[classes[label]] += 1


def _bytes_summary(stats, annotation_bytes: int, out: Path, files: Dict[str, List[str]]) -> dict:
    stats = list(stats)
    before = sum(s.bytes_before for s in stats)
    after = sum(s.bytes_after for s in stats)
    return {
        "images_before": before,
        "images_after": after,
        "metadata_removed": sum(s.metadata_removed for s in stats),
        "annotations_before": annotation_bytes,
        "tfrecords": sum((out / name).stat().st_size for names in files.values() for name in names),
    }


def summary(manifest: dict, out: str | os.PathLike) -> str:
    """The readable report printed at the end of a conversion."""
    classes = manifest["classes"]
    width = max(len(label) for label in [*classes, "ignore regions", "skipped images"])
    lines = [f"dataset written to {out} ({tfrecord.MANIFEST})"]
    header = f"  {'':{width}}" + "".join(f" {split:>12}" for split in manifest["splits"])
    lines.append(header)

    def row(label, values):
        lines.append(f"  {label:{width}}" + "".join(f" {v:>12}" for v in values))

    splits = list(manifest["splits"].values())
    row("images", [s["images"] for s in splits])
    for name in classes:
        row(name, [f"{s['objects_per_class'][name]} obj" for s in splits])
    row("ignore regions", [s["ignore_regions"] for s in splits])
    row("no objects", [s["negatives"] for s in splits])
    row("boxes clipped", [s["boxes_clipped"] for s in splits])
    row("boxes dropped", [s["boxes_dropped"] for s in splits])
    row("ignore dropped", [s["ignore_regions_dropped"] for s in splits])
    row("skipped images", [len(s["skipped"]) for s in splits])
    b = manifest["bytes"]
    saved = b["images_before"] - b["images_after"]
    lines.append(
        f"  image bytes {b['images_before']:,} -> {b['images_after']:,} ({saved:,} saved, "
        f"{b['metadata_removed']:,} of them metadata); TFRecords {b['tfrecords']:,} bytes"
    )
    for split, s in manifest["splits"].items():
        for item in s["skipped"][:10]:
            lines.append(f"  skipped ({split}) {item['file']}: {item['reason']}")
        if len(s["skipped"]) > 10:
            lines.append(f"  ... and {len(s['skipped']) - 10} more in {split} (listed in {tfrecord.MANIFEST})")
    return "\n".join(lines)
