"""Batch-norm statistics recomputed after training (the moving averages lag in short runs)."""

from __future__ import annotations

from kprune._keras import keras


def batch_norm_layers(model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate_batch_norm(model, batches) -> int:
    """Recompute the moving mean and variance of every trainable batch norm as the plain average of
    the batch statistics over ``batches`` (forward passes in training mode, no weight update);
    returns the number of batches used. Frozen layers (``trainable=False``) keep their statistics."""
    layers = batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    count = 0
    try:
        for images in batches:
            for layer in layers:  # moving = (k * moving + batch) / (k + 1): a running mean
                layer.momentum = count / (count + 1.0)
            model(images, training=True)  # eager, so each call sees the new momentum
            count += 1
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return count
