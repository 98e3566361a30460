"""Anchors fitted to a dataset: YOLOv2's dimension clusters.

The box shapes of the training split are clustered by k-means with ``1 - IoU`` as the distance
(boxes compared as if they shared their centre), so the anchors fit the objects of the data rather
than COCO's. Sizes are fractions of the square network input: with letterboxing, of the longer image
side; stretched, of each side.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from kprune._keras import tf
from kprune.data.tfrecord import Manifest, parse_example, read_manifest

_DEFAULT_RESTARTS = 5
_DEFAULT_ITERATIONS = 100


def box_sizes(data, split: str = "train", letterbox: bool = True) -> np.ndarray:
    """The (width, height) of every object of ``split`` as fractions of the network input.

    Only the box and size features are parsed (no image is decoded).

    Args:
        data: the dataset folder (with ``dataset.json``) or its :class:`Manifest`.
        split: the split to read.
        letterbox: sizes relative to the longer image side (Darknet's letterbox) instead of each side.

    Returns:
        float32 array (N, 2).

    Raises:
        ValueError: the split is missing or has no objects.
    """
    manifest = data if isinstance(data, Manifest) else read_manifest(data)

    def sizes(serialized):
        example = parse_example(serialized)
        boxes = example["boxes"]
        wh = tf.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
        if letterbox:
            hw = tf.cast(tf.stack([example["width"], example["height"]]), tf.float32)
            wh = wh * hw / tf.reduce_max(hw)
        return wh

    records = tf.data.TFRecordDataset(manifest.files(split)).map(sizes, num_parallel_calls=tf.data.AUTOTUNE)
    found = [batch.numpy() for batch in records]
    result = np.concatenate(found).astype(np.float32) if found else np.zeros((0, 2), np.float32)
    result = result[(result > 0).all(axis=1)]
    if not len(result):
        raise ValueError(f"split {split!r} of {manifest.folder} has no objects to fit anchors to")
    return result


def shape_iou(sizes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of every (w, h) in ``sizes`` (N, 2) with every anchor (K, 2), centres aligned: (N, K)."""
    sizes = np.asarray(sizes, np.float64)[:, None, :]
    anchors = np.asarray(anchors, np.float64)[None, :, :]
    inter = np.prod(np.minimum(sizes, anchors), axis=-1)
    return inter / (np.prod(sizes, axis=-1) + np.prod(anchors, axis=-1) - inter)


def mean_best_iou(sizes: np.ndarray, anchors: Sequence[Sequence[float]]) -> float:
    """The average over the boxes of their IoU with the best-fitting anchor (YOLOv2's 'Avg IOU')."""
    return float(shape_iou(sizes, np.asarray(anchors)).max(axis=1).mean())


def kmeans_anchors(sizes: np.ndarray, k: int, seed: int = 0, restarts: int = _DEFAULT_RESTARTS,
                   iterations: int = _DEFAULT_ITERATIONS) -> Tuple[np.ndarray, float]:
    """k anchor shapes by k-means under the ``1 - IoU`` distance, the best of ``restarts`` runs.

    Each run starts from k distinct boxes drawn at random and moves every centre to the median
    shape of its members (robust to the long tail of large boxes) until the assignment is stable.

    Args:
        sizes: (N, 2) box widths and heights, N >= k.
        k: number of anchors.
        seed: seeds the starting boxes.

    Returns:
        (anchors (k, 2) sorted by area, smallest first; their mean best IoU over ``sizes``).

    Raises:
        ValueError: k < 1, or fewer distinct shapes than k.
    """
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    distinct = np.unique(sizes, axis=0)
    if k < 1 or len(distinct) < k:
        raise ValueError(f"{k} anchors from {len(distinct)} distinct box shapes: need k >= 1 and at least k shapes")
    rng = np.random.default_rng(seed)
    best, best_score = None, -1.0
    for _ in range(restarts):
        centres = distinct[rng.choice(len(distinct), k, replace=False)]
        owner = None
        for _ in range(iterations):
            assigned = shape_iou(sizes, centres).argmax(axis=1)
            if owner is not None and np.array_equal(assigned, owner):
                break
            owner = assigned
            centres = np.array([np.median(sizes[owner == j], axis=0) if np.any(owner == j) else centres[j]
                                for j in range(k)])
        score = mean_best_iou(sizes, centres)
        if score > best_score:
            best, best_score = centres, score
    return best[np.argsort(best.prod(axis=1))].astype(np.float32), best_score


def format_anchors(anchors: Sequence[Sequence[float]]) -> str:
    """Anchors as a Darknet cfg line value: ``w1,h1,  w2,h2, ...``."""
    return ",  ".join(f"{w:g},{h:g}" for w, h in anchors)

