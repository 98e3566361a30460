"""Unstructured magnitude pruning through tfmot: zeros inside the kernels.

tfmot does the masking: :func:`wrap` puts ``prune_low_magnitude`` wrappers with one schedule per
layer around the kernels in scope (Conv2D, DepthwiseConv2D and Dense kernels; biases and batch norm
are never pruned), training with :class:`tfmot.sparsity.keras.UpdatePruningStep` applies the
schedule, and :func:`~kprune.models.sparsity.strip` removes the wrappers. The three methods differ only in the sparsity
each layer gets (tfmot then zeroes that layer's smallest weights):

- ``percentage``: the same fraction in every layer;
- ``threshold``: one magnitude threshold for all kernels, i.e. each layer's share of weights below it;
- ``global``: the threshold that makes the overall sparsity of the kernels in scope the target.

Schedules (:func:`make_schedule`): tfmot's ConstantSparsity, and PolynomialDecay with power 3 (the
cubic gradual schedule), with begin and end steps from epochs x steps per epoch. tfmot only prunes
at steps where ``(step - begin) % frequency == 0``, so the frequency is lowered to a divisor of
``end - begin``: the last update then falls on the end step and reaches the target exactly.

Retraining a pruned model: tfmot masks the forward pass and re-applies the masks at each epoch end,
but not gradients nor Adam's moments, so fine-tuning a stripped model revives pruned weights.
:func:`~kprune.models.sparsity.keep_masks` therefore wraps a sparse model again with its current zeros as
fixed masks; strip only after retraining. The wrapping itself (:mod:`kprune.models.sparsity`) lives
with the models, because training keeps masks too.
"""

from __future__ import annotations

from typing import Dict, Iterable

import numpy as np
import tensorflow_model_optimization as tfmot

from kprune.models.sparsity import kernel_values, pruning_wrappers

METHODS = ("threshold", "percentage", "global")
SCHEDULES = ("constant", "polynomial")


def layer_sparsities(model, method: str, value: float, layers: Iterable[str]) -> Dict[str, float]:
    """The sparsity each layer gets: ``value`` is the fraction (``percentage``, ``global``) or the
    magnitude threshold (``threshold``).

    Raises:
        ValueError: unknown method, a fraction outside [0, 1), or a negative threshold.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    names = list(layers)
    if method == "threshold":
        if value < 0:
            raise ValueError(f"threshold {value}: must be >= 0")
        threshold = float(value)
    else:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity {value}: must be in [0, 1)")
        if method == "percentage":
            return {name: float(value) for name in names}
        magnitudes = np.concatenate([np.abs(kernel_values(model.get_layer(n))).ravel() for n in names])
        k = int(round(value * magnitudes.size))
        threshold = float(np.partition(magnitudes, k)[k]) if k < magnitudes.size else np.inf
    out = {}
    for name in names:
        kernel = np.abs(kernel_values(model.get_layer(name)))
        out[name] = min(float(np.mean(kernel < threshold)), 1.0 - 1.0 / kernel.size)
    return out


def make_schedule(kind: str, target: float, begin_step: int = 0, end_step: int = 0, frequency: int = 100,
                  initial: float = 0.0):
    """A tfmot schedule that reaches ``target`` at ``end_step`` (see the module docstring).

    Raises:
        ValueError: unknown kind, ``end_step < begin_step``, or a sparsity outside [0, 1).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")
    if end_step < begin_step or begin_step < 0:
        raise ValueError(f"pruning steps {begin_step}..{end_step}: need 0 <= begin <= end")
    for name, sparsity in (("target", target), ("initial", initial)):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"{name} sparsity {sparsity}: must be in [0, 1)")
    span = end_step - begin_step
    frequency = max(1, min(int(frequency), span)) if span else 1
    while span % frequency:
        frequency -= 1
    if kind == "constant":
        return tfmot.sparsity.keras.ConstantSparsity(target, begin_step, end_step, frequency)
    end_step = max(end_step, begin_step + 1)  # tfmot's PolynomialDecay needs end > begin
    return tfmot.sparsity.keras.PolynomialDecay(initial, target, begin_step, end_step, power=3, frequency=frequency)


def prune_now(wrapped, step: int = 0) -> None:
    """Apply every wrapper's schedule at ``step`` once, without training (one-shot pruning)."""
    for layer in pruning_wrappers(wrapped):
        layer.pruning_step.assign(step)
        layer.pruning_obj.conditional_mask_update()
        layer.pruning_obj.weight_mask_op()
