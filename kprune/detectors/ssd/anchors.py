"""SSD default boxes fitted to a dataset, the counterpart of YOLOv2's dimension clusters.

SSD spreads its box scales evenly between fixed bounds (0.2 and 0.95 of the input for SSDLite), which
suits COCO; on data whose objects are smaller or larger, many objects match no default box well.
Fitting keeps every map's layout (boxes per location, aspect ratios, so the predictors' channels do
not change) and sets the scales geometrically from the 2nd to the 98th percentile of the training
boxes' scales sqrt(w h): scale k of the maps' L + 1 is that range's k / L point, map k's boxes have
min size scale k and (where it has one) max size scale k + 1.
"""

from __future__ import annotations

import numpy as np

from kprune.data.anchors import box_sizes, mean_best_iou
from kprune.detectors.ssd.priors import level_shapes

PERCENTILES = (2.0, 98.0)


def prior_sizes(specs) -> np.ndarray:
    """Every distinct (w, h) of the default boxes of all maps, as fractions of the input."""
    return np.asarray([(w, h) for spec in specs for h, w in level_shapes(spec)], np.float32)


def fitted_specs(specs, scales: np.ndarray) -> list:
    """``specs`` with their sizes set from box ``scales`` (see the module docstring)."""
    low, high = np.percentile(scales, PERCENTILES)
    steps = low * (high / low) ** (np.arange(len(specs) + 1) / len(specs))
    return [{**spec, "min_size": round(float(steps[k]), 5),
             "max_size": None if spec["max_size"] is None else round(float(steps[k + 1]), 5)}
            for k, spec in enumerate(specs)]


def fit_priors(model, head, data, split: str = "train", letterbox: bool = True) -> dict:
    """Set the default-box sizes of ``head`` (an SSD model's MultiBoxHead) to fit ``data``.

    Returns:
        ``{"priors": the new specs, "mean_iou": ..., "mean_iou_before": ..., "text": a line to print}``;
        mean IoU: of each training box with its best default-box shape, centres aligned.

    Raises:
        ValueError: as :func:`kprune.data.anchors.box_sizes`.
    """
    sizes = box_sizes(data, split, letterbox)
    before = mean_best_iou(sizes, prior_sizes(head.priors))
    head.priors = fitted_specs(head.priors, np.sqrt(sizes.prod(axis=1)))
    after = mean_best_iou(sizes, prior_sizes(head.priors))
    scales = ", ".join(f"{spec['min_size']:.3g}" for spec in head.priors)
    return {"priors": head.priors, "mean_iou": after, "mean_iou_before": before,
            "text": f"default boxes fitted to the training boxes: scales {scales} of the input"}
