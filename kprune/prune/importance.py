"""Filter importance: one score per output channel of each producer, then one per unit.

- ``l1``: sum of |w| over the filter (Li et al., "Pruning Filters for Efficient ConvNets").
- ``l2``: Euclidean norm of the filter.
- ``bn-gamma``: |gamma| of the batch norm right after the conv (network slimming).
- ``l1-normalized``: mean |w| of the filter divided by the mean of that over its layer, so that
  layers of different fan-in compare fairly in a global ranking (gradual global pruning).

A unit (channels removed together, see :mod:`kprune.prune.graph`) scores the mean of its members.
"""

from __future__ import annotations

from typing import Dict, Iterable

import numpy as np

from kprune._keras import keras

CRITERIA = ("l1", "l2", "bn-gamma", "l1-normalized")


def _following_batch_norm(model, layer):
    for node in layer.outbound_nodes:
        if isinstance(node.layer, keras.layers.BatchNormalization) and node.layer in model.layers:
            return node.layer
    return None


def filter_scores(model, producers: Iterable[str], criterion: str) -> Dict[str, np.ndarray]:
    """Score of every output channel of the named producer layers.

    Raises:
        ValueError: unknown criterion, or ``bn-gamma`` for a layer with no batch norm after it.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    scores = {}
    for name in producers:
        layer = model.get_layer(name)
        kernel = np.abs(layer.get_weights()[0])
        flat = kernel.reshape(-1, kernel.shape[-1])
        if criterion == "l1":
            scores[name] = flat.sum(axis=0)
        elif criterion == "l2":
            scores[name] = np.sqrt((flat.astype(np.float64) ** 2).sum(axis=0))
        elif criterion == "l1-normalized":
            mean = flat.mean(axis=0)
            scores[name] = mean / max(float(mean.mean()), 1e-12)
        else:
            bn = _following_batch_norm(model, layer)
            if bn is None or not bn.scale:
                raise ValueError(f"criterion bn-gamma: layer {name} is not followed by a batch norm with a scale")
            scores[name] = np.abs(bn.gamma.numpy())
    return scores


def unit_score(unit, scores: Dict[str, np.ndarray]) -> float:
    """Mean score of the unit's member channels."""
    values = np.concatenate([scores[name][indices] for name, indices in unit.members.items()])
    return float(values.mean())
