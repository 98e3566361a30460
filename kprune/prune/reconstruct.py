"""Channel pruning with reconstruction (He et al. 2017; ThiNet, Luo et al. 2017): after filter
removal, every conv that lost input channels has its weights re-fit by least squares so that its
outputs on training images come back as close as the kept inputs allow to the dense model's.

For each such conv, in model order (so each fit sees the inputs the fits before it produce), the
fit takes sampled output positions of a few training images: the rows are the pruned model's input
patches there (``tf.image.extract_patches`` with the conv's kernel, strides, dilation and padding,
laid out as the Keras kernel (kh, kw, c_in) flattens), the targets the dense model's conv outputs
(before batch norm and activation) at the kept output channels; the kernel (and bias) solve the
ridge-regularised normal equations, accumulated batch by batch. Every fifth image is held out, and
the relative error of the layer's outputs at its sampled positions is reported before and after.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from kprune._keras import keras, tf
from kprune.prune.surgeon import History

POSITIONS_PER_IMAGE = 64
RIDGE = 1e-3  # relative to the mean diagonal of the normal matrix


def _reconstructible(dense, pruned) -> List[str]:
    """Plain convs (no groups, not depthwise) whose input lost channels, in model order."""
    names = []
    for layer in pruned.layers:
        if type(layer) is not keras.layers.Conv2D or getattr(layer, "groups", 1) != 1:
            continue
        before = dense.get_layer(layer.name).kernel.shape[2]
        if layer.kernel.shape[2] < before:
            names.append(layer.name)
    return names


def _patches(x, layer):
    kh, kw = layer.kernel_size
    return tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1],
                                    rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())


def reconstruct(dense, pruned, history: History, batches, seed: int = 0,
                positions: int = POSITIONS_PER_IMAGE, ridge: float = RIDGE) -> List[Dict]:
    """Re-fit, in place, the convs of ``pruned`` whose inputs lost channels to the dense model's outputs.

    Args:
        dense: the model before pruning (unchanged).
        pruned: the pruned model (its layers named as in ``dense``); changed in place.
        history: the pruning history (layer -> kept filters of ``dense``).
        batches: a callable returning an iterable of image batches (called once per layer).
        seed: of the sampled positions.
        positions: sampled output positions per image.
        ridge: Tikhonov weight, relative to the normal matrix's mean diagonal.

    Returns:
        Per re-fit layer: ``name``, ``rows`` (positions fitted), ``error_before`` and ``error_after``
        (relative squared error of the layer's outputs on the held-out images, ``|Y - Ŷ|² / |Y|²``).

    Raises:
        ValueError: fewer than 5 images.
    """
    report = []
    for name in _reconstructible(dense, pruned):
        layer, reference = pruned.get_layer(name), dense.get_layer(name)
        kept = np.asarray(history.get(name, range(reference.filters)))
        source = keras.Model(pruned.inputs, layer.input)
        target = keras.Model(dense.inputs, reference.output if reference.activation is keras.activations.linear
                             else _pre_activation(dense, reference))
        rng = np.random.default_rng(seed)
        width = int(np.prod(layer.kernel.shape[:3])) + int(layer.use_bias)
        normal, cross = np.zeros((width, width)), np.zeros((width, len(kept)))
        held_a, held_y, fitted, seen = [], [], 0, 0
        for images in batches():
            a = _patches(source(images, training=False), layer).numpy()
            y = target(images, training=False).numpy()[..., kept]
            a, y = a.reshape(len(a), -1, a.shape[-1]), y.reshape(len(y), -1, y.shape[-1])
            for image_a, image_y in zip(a, y):
                chosen = rng.choice(len(image_a), size=min(positions, len(image_a)), replace=False)
                rows = np.asarray(image_a[chosen], np.float64)
                if layer.use_bias:
                    rows = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
                wanted = np.asarray(image_y[chosen], np.float64)
                seen += 1
                if seen % 5 == 0:
                    held_a.append(rows)
                    held_y.append(wanted)
                else:
                    fitted += len(rows)
                    normal += rows.T @ rows
                    cross += rows.T @ wanted
        if not held_a:
            raise ValueError(f"reconstruction of {name}: the data gave {seen} images; at least 5 are needed "
                             "(every fifth is held out)")
        old = layer.kernel.numpy().reshape(-1, layer.filters)
        if layer.use_bias:
            old = np.concatenate([old, layer.bias.numpy()[None]], axis=0)
        scale = ridge * max(float(np.mean(np.diag(normal))), 1e-12)
        solved = np.linalg.solve(normal + scale * np.eye(width), cross)
        ha, hy = np.concatenate(held_a), np.concatenate(held_y)
        energy = max(float(np.sum(hy ** 2)), 1e-12)
        report.append({"name": name, "rows": fitted,
                       "error_before": float(np.sum((ha @ old - hy) ** 2)) / energy,
                       "error_after": float(np.sum((ha @ solved - hy) ** 2)) / energy})
        kernel = solved[:int(np.prod(layer.kernel.shape[:3]))].reshape(layer.kernel.shape)
        layer.kernel.assign(kernel.astype(np.float32))
        if layer.use_bias:
            layer.bias.assign(solved[-1].astype(np.float32))
    return report


def _pre_activation(model, layer):
    """The conv's output before its own activation: its kernel applied to its input, plus bias."""
    x = layer.input
    y = tf.nn.convolution(x, layer.kernel, strides=layer.strides, padding=layer.padding.upper(),
                          dilations=layer.dilation_rate)
    return y + layer.bias if layer.use_bias else y
