"""Sparse kernels under tfmot wrappers: wrapping a model, fixed masks that keep a sparse model's
zeros through training (tfmot masks neither gradients nor Adam's moments, so fine-tuning a stripped
model would revive pruned weights), stripping, and measuring sparsity. Pruning methods
(:mod:`kprune.prune.unstructured`) and training runs (``keep_sparsity``) both use it.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np
import tensorflow_model_optimization as tfmot

from kprune._keras import keras, tf

#: the layers whose kernels are pruned and counted
KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def kernel_values(layer) -> np.ndarray:
    kernel = layer.depthwise_kernel if isinstance(layer, keras.layers.DepthwiseConv2D) else layer.kernel
    return kernel.numpy()


def wrap(model, schedules: Dict[str, object]):
    """A copy of ``model`` with tfmot wrappers on the named layers (``schedules``: name -> schedule)."""
    unknown = sorted(set(schedules) - {layer.name for layer in model.layers})
    if unknown:
        raise ValueError(f"model {model.name!r} has no layer(s) {', '.join(unknown)}")

    def clone(layer):
        copy = layer.__class__.from_config(layer.get_config())
        if layer.name in schedules:
            return tfmot.sparsity.keras.prune_low_magnitude(copy, pruning_schedule=schedules[layer.name])
        return copy

    wrapped = keras.models.clone_model(model, clone_function=clone)
    inner = {getattr(layer, "layer", layer).name: getattr(layer, "layer", layer) for layer in wrapped.layers}
    for layer in model.layers:
        if layer.weights:
            inner[layer.name].set_weights(layer.get_weights())
    return wrapped


def pruning_wrappers(model) -> list:
    """The tfmot wrappers of a model (nested models included)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += pruning_wrappers(layer)
        elif hasattr(layer, "pruning_obj"):
            found.append(layer)
    return found


@keras.saving.register_keras_serializable(package="kprune")
class KeepMask(tfmot.sparsity.keras.PruningSchedule):
    """A tfmot schedule that never updates the mask: it stays what :func:`keep_masks` set."""

    def __init__(self, sparsity: float = 0.0):
        self.sparsity = float(sparsity)

    def __call__(self, step):
        return tf.constant(False), tf.constant(self.sparsity, tf.float32)

    def get_config(self):
        return {"class_name": "KeepMask", "config": {"sparsity": self.sparsity}}


def keep_masks(model, layers: Optional[Iterable[str]] = None):
    """Wrap a sparse model for retraining: every kernel that has zeros (of ``layers``, or all)
    gets a tfmot wrapper whose fixed mask is its non-zero pattern. Train with
    ``UpdatePruningStep``, then :func:`strip`."""
    current = sparsity(model, layers)
    wrapped = wrap(model, {name: KeepMask(s) for name, s in current.items() if s > 0})
    for layer in pruning_wrappers(wrapped):
        for weight, mask, _ in layer.pruning_vars:
            mask.assign(tf.cast(tf.not_equal(weight, 0), mask.dtype))
    return wrapped


def strip(wrapped):
    """The model without tfmot wrappers (the masks applied once more first)."""
    for layer in pruning_wrappers(wrapped):
        layer.pruning_obj.weight_mask_op()
    return tfmot.sparsity.keras.strip_pruning(wrapped)


def sparsity(model, layers: Optional[Iterable[str]] = None) -> Dict[str, float]:
    """Fraction of exact zeros in each kernel (of ``layers``, or of every Conv2D / Dense layer)."""
    names = list(layers) if layers is not None else [l.name for l in model.layers if isinstance(l, KERNEL_LAYERS)]
    return {name: float(np.mean(kernel_values(model.get_layer(name)) == 0)) for name in names}
