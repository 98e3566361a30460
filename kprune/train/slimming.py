"""Sparsity training for network slimming (Liu et al. 2017, as SlimYOLOv3 prunes YOLOv3): an L1
penalty ``λ * sum |gamma|`` over the scales of every batch norm drives the scales of unneeded
channels towards zero, so that the ``bn-gamma`` criterion then finds them. The distribution of the
scales before and after training goes into the run's metrics."""

from __future__ import annotations

from typing import Dict

import numpy as np

from kprune._keras import tf
from kprune.train.batchnorm import batch_norm_layers

SMALL_GAMMA = 0.01  # |gamma| below this: a channel slimming has (nearly) switched off


def gamma_penalty(model):
    """``sum |gamma|`` over the model's batch norms with a scale (a tensor; 0.0 without any)."""
    gammas = [layer.gamma for layer in batch_norm_layers(model) if layer.scale]
    return tf.add_n([tf.reduce_sum(tf.abs(tf.cast(g, tf.float32))) for g in gammas]) if gammas else 0.0


def gamma_stats(model) -> Dict[str, float]:
    """The distribution of |gamma| over every batch-norm channel: ``channels``, ``median``,
    ``p10``, ``p90`` and ``small`` (the fraction below :data:`SMALL_GAMMA`)."""
    values = [np.abs(layer.gamma.numpy()).ravel() for layer in batch_norm_layers(model) if layer.scale]
    if not values:
        return {"channels": 0}
    g = np.concatenate(values)
    return {"channels": int(g.size), "median": float(np.median(g)), "p10": float(np.percentile(g, 10)),
            "p90": float(np.percentile(g, 90)), "small": float(np.mean(g < SMALL_GAMMA))}
