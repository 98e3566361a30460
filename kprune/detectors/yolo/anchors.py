"""A YOLO model's anchors fitted to a dataset (the dimension clusters of :mod:`kprune.data.anchors`),
written in each head's units: grid cells for region (YOLOv2) heads, input pixels for yolo heads."""

from __future__ import annotations

import numpy as np

from kprune.data.anchors import box_sizes, format_anchors, kmeans_anchors, mean_best_iou
from kprune.models.layers import detection_heads


def head_units(head, input_size: int, grid: int) -> float:
    """What one anchor unit is, as a fraction of the input: a grid cell (region) or a pixel (yolo)."""
    return 1.0 / grid if head.kind == "region" else 1.0 / input_size


def fit_anchors(model, data, split: str = "train", letterbox: bool = True, seed: int = 0) -> dict:
    """Replace the anchors of every detection head of ``model`` by dimension clusters of ``data``.

    Every head keeps its number of anchors (and yolo heads their masks); the clusters are written in
    each head's units (grid cells at this input size for region heads, input pixels for yolo heads).
    Only for heads that are trained from scratch: a trained head's outputs are relative to the
    anchors it was trained with.

    Returns:
        ``{"anchors": [[w, h], ...] per head, "mean_iou": ..., "mean_iou_before": ...}``.

    Raises:
        ValueError: the model's input size is not fixed, or as :func:`box_sizes`.
    """
    size = model.input_shape[1]
    if size is None:
        raise ValueError("anchors are fitted at a fixed input size; build the model with input_size")
    sizes = box_sizes(data, split, letterbox)
    heads = detection_heads(model)
    count = len(heads[0].anchors)
    fractions, score = kmeans_anchors(sizes, count, seed=seed)
    # every head of a model shares one anchor list, so the first says how well the old ones fit
    before = mean_best_iou(sizes, np.asarray(heads[0].anchors) * head_units(heads[0], size, heads[0].input_shape[1]))
    after = []
    for head in heads:
        unit = head_units(head, size, head.input_shape[1])
        head.anchors = [[round(float(v) / unit, 4) for v in pair] for pair in fractions]
        after.append([list(pair) for pair in head.anchors])
    return {"anchors": after, "mean_iou": score, "mean_iou_before": before,
            "text": f"anchors fitted to the training boxes: {format_anchors(after[0])}"}
