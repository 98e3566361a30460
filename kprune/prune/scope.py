"""Which layers a pruning touches: ``all``, ``backbone``, ``head`` or a regular expression.

The backbone / head split of a Darknet model comes from
:data:`kprune.models.zoo.BACKBONE_LAST_LAYER` (by model name; layers are named ``conv_N`` after
their cfg index N). Output convs — those whose output is a model output, i.e. the detection
layers — are left out unless ``outputs=True``.
"""

from __future__ import annotations

import re
from typing import List

from kprune._keras import keras, tf

SCOPES = ("all", "backbone", "head")
KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def _cfg_index(name: str):
    prefix, _, number = name.rpartition("_")
    return int(number) if prefix and number.isdigit() else None


def output_layers(model) -> List[str]:
    """Names of the kernel layers whose output reaches a model output through identity-like
    layers only (the detection convs, a classifier's last dense)."""
    found = []
    for tensor in tf.nest.flatten(model.outputs):
        layer = tensor._keras_history.layer
        while not isinstance(layer, KERNEL_LAYERS) and len(layer._inbound_nodes) == 1 \
                and len(layer._inbound_nodes[0].keras_inputs) == 1:
            layer = layer._inbound_nodes[0].keras_inputs[0]._keras_history.layer
        if isinstance(layer, KERNEL_LAYERS):
            found.append(layer.name)
    return found


def layers_in_scope(model, scope: str = "all", outputs: bool = False) -> List[str]:
    """Names of the Conv2D / DepthwiseConv2D / Dense layers in ``scope``, in model order.

    Args:
        scope: ``all``, ``backbone``, ``head``, or a regular expression searched in layer names.
        outputs: include the output layers (see :func:`output_layers`).

    Raises:
        ValueError: an invalid expression, a scope that matches no layer, or ``backbone``/``head``
            for a model whose split is unknown.
    """
    from kprune.models.zoo import BACKBONE_LAST_LAYER

    layers = [layer for layer in model.layers if isinstance(layer, KERNEL_LAYERS)]
    if not outputs:
        excluded = set(output_layers(model))
        layers = [layer for layer in layers if layer.name not in excluded]
    if scope == "all":
        chosen = layers
    elif scope in ("backbone", "head"):
        last = BACKBONE_LAST_LAYER.get(model.name)
        if last is None:
            raise ValueError(f"scope {scope}: the backbone of model {model.name!r} is not known (known: "
                             f"{', '.join(sorted(BACKBONE_LAST_LAYER))}); give a regular expression instead")
        in_backbone = [(_cfg_index(layer.name) is not None and _cfg_index(layer.name) <= last) for layer in layers]
        chosen = [layer for layer, b in zip(layers, in_backbone) if b == (scope == "backbone")]
    else:
        try:
            pattern = re.compile(scope)
        except re.error as exc:
            raise ValueError(f"scope {scope!r} is not a valid regular expression: {exc}") from None
        chosen = [layer for layer in layers if pattern.search(layer.name)]
    if not chosen:
        raise ValueError(f"scope {scope!r} matches no prunable layer of model {model.name!r}")
    return [layer.name for layer in chosen]
