"""Counting a model: parameters, non-zero parameters, FLOPs, shapes.

FLOPs follow Darknet's convention: 2 x the multiply-adds of convolution and dense layers (other
layers are not counted), so the figures compare with Darknet's BFLOPs.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np

from kprune._keras import keras, tf


def leaf_layers(model) -> Iterator:
    """The layers of ``model``, those of nested models in their place."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer


def _size(weights) -> int:
    return int(sum(int(np.prod(w.shape)) for w in weights))


def count_params(model) -> Dict[str, int]:
    """Parameter counts.

    Returns:
        ``params`` (all weights, as a Darknet .weights file stores them: batch-norm moving mean and
        variance included), ``trainable_params``, ``non_trainable_params`` and ``nonzero_params``
        (weights that are not exactly zero, the figure unstructured pruning lowers).
    """
    trainable = _size(model.trainable_weights)
    non_trainable = _size(model.non_trainable_weights)
    nonzero = int(sum(int(np.count_nonzero(w.numpy())) for w in model.weights))
    return {
        "params": trainable + non_trainable,
        "trainable_params": trainable,
        "non_trainable_params": non_trainable,
        "nonzero_params": nonzero,
    }


def layer_flops(layer, output_shape=None) -> int:
    """2 x multiply-adds of one Conv2D / DepthwiseConv2D / Dense layer (0 for any other layer).

    Args:
        output_shape: the output shape of the call counted; default the layer's own (which a layer
            called on several inputs of different shapes, such as a shared RPN head, does not have).
    """
    if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
        return 0
    shape = layer.output_shape if output_shape is None else tuple(output_shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, c_in, multiplier = layer.depthwise_kernel.shape
        _, h, w, _ = shape
        return 2 * kh * kw * c_in * multiplier * h * w
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, c_per_group, c_out = layer.kernel.shape
        _, h, w, _ = shape
        return 2 * kh * kw * c_per_group * c_out * h * w
    c_in, c_out = layer.kernel.shape
    positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
    return 2 * c_in * c_out * positions


def count_flops(model) -> int:
    """Total FLOPs of one forward pass of one image (see :func:`layer_flops`): every call of a
    layer in the model's graph counts, so a layer shared by several inputs counts once per input."""
    if not getattr(model, "_is_graph_network", False):
        return int(sum(layer_flops(layer) for layer in leaf_layers(model)))
    total = 0
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if node.is_input:
                continue
            if isinstance(node.layer, keras.Model):
                total += count_flops(node.layer)
            else:
                total += layer_flops(node.layer, tf.nest.flatten(node.outputs)[0].shape)
    return int(total)


def _shape(shape) -> List:
    return [None if d is None else int(d) for d in shape]


def model_info(model) -> Dict:
    """Parameters, FLOPs, input and output shapes of a model, as ``kprune info --json`` prints them."""
    outputs = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
    return {
        "name": model.name,
        **count_params(model),
        "flops": count_flops(model),
        "input_shape": _shape(model.input_shape),
        "output_shapes": [_shape(s) for s in outputs],
    }
