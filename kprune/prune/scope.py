"""Which layers a pruning touches: ``all``, ``backbone``, ``head``, a part a detector family names
(a Faster R-CNN's ``fpn``, ``rpn``, ``roi_head``) or a regular expression.

The backbone / head split travels with the model: its head layer names the layers that end the
backbone (:meth:`kprune.detectors.base.DetectorFamily.backbone_boundary`), and the backbone is
everything they depend on; the head is the rest. A family's own parts come from its
:meth:`~kprune.detectors.base.DetectorFamily.scopes`, found from the model too. Output convs — the detector's predictors, or for
a model of no family the kernel layers whose output is a model output — are left out unless
``outputs=True``.
"""

from __future__ import annotations

import re
from typing import List

from kprune._keras import tf
from kprune.detectors import FAMILIES, family_of
from kprune.detectors.base import backbone_layers as depends_on
from kprune.models.sparsity import KERNEL_LAYERS

#: the named scopes: every model's, then the parts the families name (in registry order)
SCOPES = ("all", "backbone", "head") + tuple(dict.fromkeys(
    name for family in FAMILIES.values() for name in family.scope_names))


def backbone_layers(model) -> List[str]:
    """Names of the layers of the model's backbone.

    Raises:
        ValueError: the model carries no backbone boundary (the message says how to give one).
    """
    try:
        boundary = family_of(model).backbone_boundary(model)
    except ValueError:
        boundary = None
    if not boundary:
        raise ValueError(f"model {model.name!r} does not say where its backbone ends (its head layer stores no "
                         "backbone boundary: a cfg whose first layers are no known Darknet trunk, or a model of no "
                         "detector family); give the layers as a regular expression instead, e.g. "
                         "--scope 'conv_([0-9]|1[0-9])$'")
    return depends_on(model, boundary)


def output_layers(model) -> List[str]:
    """Names of the kernel layers whose output is what the model predicts: a detector's predictor
    convs; for any other model, the kernel layers whose output reaches a model output through
    identity-like layers only (a classifier's last dense)."""
    try:
        family = family_of(model)
    except ValueError:
        family = None
    if family is not None:
        return list(family.predictor_convs(model))
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
        scope: ``all``, ``backbone``, ``head``, a part the model's family names (:data:`SCOPES`),
            or a regular expression searched in layer names.
        outputs: include the output layers (see :func:`output_layers`).

    Raises:
        ValueError: an invalid expression, a scope that matches no layer, ``backbone``/``head``
            for a model whose split is unknown, or a family's part for a model of another family.
    """
    layers = [layer for layer in model.layers if isinstance(layer, KERNEL_LAYERS)]
    if not outputs:
        excluded = set(output_layers(model))
        layers = [layer for layer in layers if layer.name not in excluded]
    if scope == "all":
        chosen = layers
    elif scope in ("backbone", "head"):
        backbone = set(backbone_layers(model))
        chosen = [layer for layer in layers if (layer.name in backbone) == (scope == "backbone")]
    elif scope in SCOPES:
        try:
            family = family_of(model)
        except ValueError:
            family = None
        if family is None or scope not in family.scope_names:
            known = ", ".join(("all", "backbone", "head") + (family.scope_names if family else ()))
            raise ValueError(f"scope {scope!r} names a part of another detector family's models; model {model.name!r} "
                             f"({family.name if family else 'no detector family'}) has the scopes {known}, or give "
                             "a regular expression")
        part = set(family.scopes(model)[scope])
        chosen = [layer for layer in layers if layer.name in part]
    else:
        try:
            pattern = re.compile(scope)
        except re.error as exc:
            raise ValueError(f"scope {scope!r} is not a valid regular expression: {exc}") from None
        chosen = [layer for layer in layers if pattern.search(layer.name)]
    if not chosen:
        raise ValueError(f"scope {scope!r} matches no prunable layer of model {model.name!r}")
    return [layer.name for layer in chosen]
