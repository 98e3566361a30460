"""The one TFRecord format of kprune: detection examples with the TensorFlow Object Detection API
keys, sharded files, and the ``dataset.json`` manifest that training and evaluation read.

Boxes are stored normalised to [0, 1] as the Object Detection API does (``.../bbox/xmin`` etc.), and
``.../class/label`` is 1-based as its label maps are (0 is its background): kprune's 0-based label k
is stored as k + 1 and read back as k.
Regions to ignore (COCO crowd, KITTI DontCare, VOC difficult) have keys of their own,
``image/ignore/bbox/...`` and ``image/ignore/text``, so that no reader can mistake them for objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from kprune._keras import tf

MANIFEST = "dataset.json"
FORMAT = "kprune-detection-tfrecord"
VERSION = 2  # 2: labels stored 1-based

HEIGHT = "image/height"
WIDTH = "image/width"
FILENAME = "image/filename"
SOURCE_ID = "image/source_id"
SHA256 = "image/key/sha256"
ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
BBOX = ("image/object/bbox/xmin", "image/object/bbox/ymin", "image/object/bbox/xmax", "image/object/bbox/ymax")
LABEL = "image/object/class/label"
TEXT = "image/object/class/text"
IGNORE_BBOX = ("image/ignore/bbox/xmin", "image/ignore/bbox/ymin", "image/ignore/bbox/xmax", "image/ignore/bbox/ymax")
IGNORE_TEXT = "image/ignore/text"

LABEL_OFFSET = 1  # stored label = label + LABEL_OFFSET (Object Detection API label maps start at 1)
_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


@dataclass
class Sample:
    """One image and its boxes, as stored.

    ``boxes`` and ``ignore`` are (N, 4) float32 arrays of normalised ``xmin, ymin, xmax, ymax``.
    """

    filename: str
    source_id: str
    encoded: bytes
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    texts: List[str]
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ignore_texts: List[str] = field(default_factory=list)
    image_format: str = "jpeg"


def _bytes(values: Sequence[bytes]):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _box_features(keys: Sequence[str], boxes: np.ndarray) -> Dict[str, tf.train.Feature]:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return {key: _floats(boxes[:, i]) for i, key in enumerate(keys)}


def serialize_sample(sample: Sample) -> bytes:
    """Encode a :class:`Sample` as a serialised ``tf.train.Example``.

    Raises:
        ValueError: labels and texts do not match the boxes in number.
    """
    boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4)
    if not len(boxes) == len(sample.labels) == len(sample.texts):
        raise ValueError(
            f"{sample.filename}: {len(boxes)} boxes, {len(sample.labels)} labels and {len(sample.texts)} texts"
        )
    ignore = np.asarray(sample.ignore, np.float32).reshape(-1, 4)
    if len(ignore) != len(sample.ignore_texts):
        raise ValueError(f"{sample.filename}: {len(ignore)} ignore regions but {len(sample.ignore_texts)} texts")
    feature = {
        HEIGHT: _ints([sample.height]),
        WIDTH: _ints([sample.width]),
        FILENAME: _bytes([sample.filename.encode("utf-8")]),
        SOURCE_ID: _bytes([sample.source_id.encode("utf-8")]),
        SHA256: _bytes([hashlib.sha256(sample.encoded).hexdigest().encode("ascii")]),
        ENCODED: _bytes([sample.encoded]),
        IMAGE_FORMAT: _bytes([sample.image_format.encode("ascii")]),
        LABEL: _ints(np.asarray(sample.labels, np.int64) + LABEL_OFFSET),
        TEXT: _bytes([t.encode("utf-8") for t in sample.texts]),
        IGNORE_TEXT: _bytes([t.encode("utf-8") for t in sample.ignore_texts]),
        **_box_features(BBOX, boxes),
        **_box_features(IGNORE_BBOX, ignore),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def deserialize_sample(data: bytes) -> Sample:
    """Decode a serialised example back into a :class:`Sample` (NumPy side, for tools and tests)."""
    feature = tf.train.Example.FromString(data).features.feature

    def floats(key):
        return np.asarray(feature[key].float_list.value, np.float32)

    def texts(key):
        return [v.decode("utf-8") for v in feature[key].bytes_list.value]

    return Sample(
        filename=feature[FILENAME].bytes_list.value[0].decode("utf-8"),
        source_id=feature[SOURCE_ID].bytes_list.value[0].decode("utf-8"),
        encoded=feature[ENCODED].bytes_list.value[0],
        height=int(feature[HEIGHT].int64_list.value[0]),
        width=int(feature[WIDTH].int64_list.value[0]),
        boxes=np.stack([floats(k) for k in BBOX], axis=-1).reshape(-1, 4),
        labels=np.asarray(feature[LABEL].int64_list.value, np.int64) - LABEL_OFFSET,
        texts=texts(TEXT),
        ignore=np.stack([floats(k) for k in IGNORE_BBOX], axis=-1).reshape(-1, 4),
        ignore_texts=texts(IGNORE_TEXT),
        image_format=feature[IMAGE_FORMAT].bytes_list.value[0].decode("ascii"),
    )


_FEATURES = {
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    FILENAME: tf.io.FixedLenFeature([], tf.string),
    SOURCE_ID: tf.io.FixedLenFeature([], tf.string),
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.VarLenFeature(tf.int64),
    **{key: tf.io.VarLenFeature(tf.float32) for key in BBOX + IGNORE_BBOX},
}


def parse_example(serialized):
    """Parse one serialised example inside a tf.data pipeline (TensorFlow ops only).

    Returns:
        dict of tensors: ``encoded`` (string), ``height``, ``width`` (int32), ``filename``,
        ``source_id`` (string), ``boxes`` (N, 4) float32 normalised xyxy, ``labels`` (N,) int32,
        ``ignore`` (M, 4) float32 normalised xyxy.
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)

    def stack(keys):
        return tf.stack([tf.sparse.to_dense(parsed[key]) for key in keys], axis=-1)

    return {
        "encoded": parsed[ENCODED],
        "height": tf.cast(parsed[HEIGHT], tf.int32),
        "width": tf.cast(parsed[WIDTH], tf.int32),
        "filename": parsed[FILENAME],
        "source_id": parsed[SOURCE_ID],
        "boxes": tf.reshape(stack(BBOX), [-1, 4]),
        "labels": tf.cast(tf.sparse.to_dense(parsed[LABEL]) - LABEL_OFFSET, tf.int32),
        "ignore": tf.reshape(stack(IGNORE_BBOX), [-1, 4]),
    }


def shard_name(split: str, index: int, count: int) -> str:
    """``{split}-{index:05d}-of-{count:05d}.tfrecord``."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _partial_name(name: str) -> str:
    return f".{name}.partial"


class ShardWriter:
    """Write examples round-robin into ``count`` shards of one split.

    Shards are written under hidden ``.NAME.partial`` names and renamed to their final names only by
    :meth:`commit`, so a killed conversion leaves no shard under a final name. Leaving the ``with``
    block by an exception deletes the partial files.
    """

    def __init__(self, folder: str | os.PathLike, split: str, count: int):
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(f"split name {split!r}: use letters, digits and '_'")
        if count < 1:
            raise ValueError(f"number of shards must be >= 1, got {count}")
        self.folder = Path(folder)
        self.names = [shard_name(split, i, count) for i in range(count)]
        self.counts = [0] * count
        self._writers = None
        self._next = 0

    def __enter__(self) -> "ShardWriter":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writers = [tf.io.TFRecordWriter(str(self.folder / _partial_name(n))) for n in self.names]
        return self

    def write(self, record: bytes) -> None:
        self._writers[self._next].write(record)
        self.counts[self._next] += 1
        self._next = (self._next + 1) % len(self.names)

    def _close(self) -> None:
        for writer in self._writers or []:
            writer.close()
        self._writers = None

    def commit(self) -> List[str]:
        """Close the shards and give them their final names; returns those names."""
        self._close()
        for name in self.names:
            os.replace(self.folder / _partial_name(name), self.folder / name)
        return list(self.names)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writers is not None:
            self._close()
        if exc_type is not None:
            for name in self.names:
                (self.folder / _partial_name(name)).unlink(missing_ok=True)


def _is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tfrecord.partial")


def _remove(folder: str | os.PathLike, doomed) -> List[str]:
    removed = sorted(p.name for p in Path(folder).iterdir() if doomed(p.name))
    for name in removed:
        (Path(folder) / name).unlink()
    return removed


def remove_partial_files(folder: str | os.PathLike) -> List[str]:
    """Delete the partial shards a killed conversion left in ``folder``; returns their names."""
    return _remove(folder, _is_partial)


def remove_stale_shards(folder: str | os.PathLike, keep: Sequence[str]) -> List[str]:
    """Delete shards (and partial shards) in ``folder`` that are not in ``keep``, such as those of an
    earlier conversion with another number of shards; returns the names removed."""
    return _remove(folder, lambda name: (_is_partial(name) or bool(_SHARD.match(name))) and name not in keep)


@dataclass(frozen=True)
class Manifest:
    """The contents of ``dataset.json``: what training and evaluation rely on."""

    folder: Path
    classes: List[str]
    splits: Dict[str, dict]
    source: dict
    data: dict

    def files(self, split: str) -> List[str]:
        """The shard paths of ``split``.

        Raises:
            ValueError: the split does not exist, or a shard it lists is missing.
        """
        if split not in self.splits:
            raise ValueError(f"{self.folder / MANIFEST}: no split {split!r}; splits: {', '.join(self.splits)}")
        paths = [str(self.folder / name) for name in self.splits[split]["files"]]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise ValueError(f"{self.folder / MANIFEST}: shard {missing[0]} of split {split!r} is missing")
        return paths

    def num_images(self, split: str) -> int:
        return int(self.splits[split]["images"])

    def max_objects(self, split: str) -> int:
        """The most objects of any image of the split (at least 1)."""
        return max(1, int(self.splits[split].get("max_objects_per_image", 1)))

    def max_ignore(self, split: str) -> int:
        """The most ignore regions of any image of the split (at least 1)."""
        return max(1, int(self.splits[split].get("max_ignore_per_image", 1)))


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read ``folder/dataset.json``.

    Raises:
        ValueError: no manifest (not a converted dataset), or it is not one this version can read.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path} not found: {folder} is not a converted dataset "
            "(make one with `python -m data_tools coco|kitti|voc|synth ...`)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a kprune dataset manifest (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {data.get('version')!r}, this kprune reads version {VERSION}")
    for key in ("classes", "splits"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    return Manifest(folder, list(data["classes"]), dict(data["splits"]), dict(data.get("source", {})), data)
