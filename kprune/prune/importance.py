"""Filter importance: a registry of criteria, each giving one score per output channel of each
producer; then one score per unit.

- ``l1``: sum of |w| over the filter (Li et al., "Pruning Filters for Efficient ConvNets").
- ``l2``: Euclidean norm of the filter.
- ``bn-gamma``: |gamma| of the batch norm right after the conv (network slimming).
- ``l1-normalized``: mean |w| of the filter divided by the mean of that over its layer, so that
  layers of different fan-in compare fairly in a global ranking (gradual global pruning).
- ``taylor``: data-driven, the first-order Taylor estimate of the loss change when the filter goes
  (Molchanov et al. 2019): (sum over the filter's weights of gradient x weight)^2, averaged over a
  few training batches.

A criterion is one class registered here (:func:`register`); the CLI's choices, the experiment
config's validation and the README's table come from :data:`CRITERIA`; the module loads without
TensorFlow (its criteria import it when they score), so that the CLI can list them quickly. A unit
(channels removed together, see :mod:`kprune.prune.graph`) scores the mean of its members.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Protocol

import numpy as np

from kprune.prune.registry import Registry


class Sample(Protocol):
    """Training data for data-driven criteria: ``batches(model)`` yields ``(images, targets)``
    for ``model``, and ``loss(model)`` is a callable ``loss(targets, outputs)`` returning a dict
    with the total as ``"loss"`` (a detector family's loss)."""

    def batches(self, model) -> Iterable: ...

    def loss(self, model) -> Callable: ...


class Criterion:
    """One way of scoring filters. Subclasses set ``name`` and ``needs_data`` and implement
    :meth:`scores`; the class docstring is the criterion's description."""

    name: str = ""
    needs_data: bool = False

    def scores(self, model, producers: Iterable[str], sample: Optional[Sample] = None) -> Dict[str, np.ndarray]:
        """Score of every output channel of the named producer layers (higher: more important)."""
        raise NotImplementedError

    @classmethod
    def description(cls) -> str:
        return " ".join((cls.__doc__ or "").split())


CRITERIA: Registry[Criterion] = Registry("criterion")
register = CRITERIA.register


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name`` (an unknown name is a ValueError listing the known ones)."""
    return CRITERIA.find(name)


def _flat_abs(model, name: str) -> np.ndarray:
    kernel = np.abs(model.get_layer(name).get_weights()[0])
    return kernel.reshape(-1, kernel.shape[-1])


@register
class L1(Criterion):
    """Sum of |w| over the filter (Li et al. 2016)."""

    name = "l1"

    def scores(self, model, producers, sample=None):
        return {name: _flat_abs(model, name).sum(axis=0) for name in producers}


@register
class L2(Criterion):
    """Euclidean norm of the filter."""

    name = "l2"

    def scores(self, model, producers, sample=None):
        return {name: np.sqrt((_flat_abs(model, name).astype(np.float64) ** 2).sum(axis=0)) for name in producers}


@register
class BatchNormGamma(Criterion):
    """|gamma| of the batch norm right after the conv (network slimming, Liu et al. 2017)."""

    name = "bn-gamma"

    def scores(self, model, producers, sample=None):
        out = {}
        for name in producers:
            bn = _following_batch_norm(model, model.get_layer(name))
            if bn is None or not bn.scale:
                raise ValueError(f"criterion bn-gamma: layer {name} is not followed by a batch norm with a scale")
            out[name] = np.abs(bn.gamma.numpy())
        return out


@register
class L1Normalized(Criterion):
    """Mean |w| of the filter over the mean of that in its layer: layers compare fairly in a global
    ranking (gradual global pruning)."""

    name = "l1-normalized"

    def scores(self, model, producers, sample=None):
        out = {}
        for name in producers:
            mean = _flat_abs(model, name).mean(axis=0)
            out[name] = mean / max(float(mean.mean()), 1e-12)
        return out


@register
class Taylor(Criterion):
    """First-order Taylor estimate of the loss change when the filter goes (Molchanov et al. 2019):
    (sum over the filter's weights of gradient x weight)^2, averaged over training batches; needs
    data."""

    name = "taylor"
    needs_data = True

    def scores(self, model, producers, sample=None):
        if sample is None:
            raise ValueError("criterion taylor scores filters on training data: give --data (a dataset)")
        from kprune._keras import tf

        producers = list(producers)
        kernels = [model.get_layer(name).kernel for name in producers]
        loss = sample.loss(model)
        totals = [np.zeros(k.shape[-1], np.float64) for k in kernels]
        count = 0
        for images, targets in sample.batches(model):
            with tf.GradientTape() as tape:
                value = loss(targets, model(images, training=False))["loss"]
            for total, kernel, grad in zip(totals, kernels, tape.gradient(value, kernels)):
                total += tf.reduce_sum(tf.cast(grad * kernel, tf.float64), axis=[0, 1, 2]).numpy() ** 2
            count += 1
        if count == 0:
            raise ValueError("criterion taylor: the data gave no batches")
        return {name: total / count for name, total in zip(producers, totals)}


def _following_batch_norm(model, layer):
    from kprune._keras import keras

    for node in layer.outbound_nodes:
        if isinstance(node.layer, keras.layers.BatchNormalization) and node.layer in model.layers:
            return node.layer
    return None


def filter_scores(model, producers: Iterable[str], criterion: str,
                  sample: Optional[Sample] = None) -> Dict[str, np.ndarray]:
    """Score of every output channel of the named producer layers by the named criterion.

    Raises:
        ValueError: an unknown criterion, a criterion that needs data without ``sample``, or what
            the criterion refuses (``bn-gamma`` for a layer with no batch norm after it).
    """
    return get_criterion(criterion).scores(model, producers, sample)


def unit_score(unit, scores: Dict[str, np.ndarray]) -> float:
    """Mean score of the unit's member channels."""
    values = np.concatenate([scores[name][indices] for name, indices in unit.members.items()])
    return float(values.mean())
