"""Physical filter removal: a new, smaller model with the kept weights copied.

The channels to remove are given as units of a :class:`~kprune.prune.graph.ChannelGraph`. Every
layer is rebuilt by its handler (a conv with fewer filters, a batch norm with fewer channels, ...)
and its weights sliced to the kept channels, so the pruned model computes exactly what the dense
model computes once the removed channels are silenced (:func:`silence_channels`).

A *history* records what was kept: producer layer name -> kept output channel indices, always in
terms of the dense model, so it can be saved with a pruned model and replayed on the dense one
(:func:`apply_history`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from kprune._keras import keras
from kprune.prune.graph import ChannelGraph, Depthwise, PerChannel, Producer, handler_for

History = Dict[str, List[int]]


def _check_not_emptied(graph: ChannelGraph, keep) -> None:
    for name, ids in graph.producers.items():
        if not keep(ids).any():
            raise ValueError(f"layer {name}: removing these channels would leave it with none")


def remove_units(model, graph: ChannelGraph, removed_roots: Sequence[int], name: Optional[str] = None):
    """The model without the channels of the given units.

    Returns:
        ``(pruned_model, history)``; the history holds the kept indices of every producer that lost
        channels, relative to ``model``.

    Raises:
        ValueError: a removed unit is protected, or a layer would be left without channels.
    """
    protection = graph.protection()
    for root in removed_roots:
        if int(root) in protection:
            raise ValueError(f"unit {root} cannot be removed: it {protection[int(root)]}")
    keep = graph.keep_masks(removed_roots)
    _check_not_emptied(graph, keep)

    def masks(layer):
        in_keep = [keep(ids) for ids in graph.layer_inputs.get(layer.name, [])]
        return in_keep, keep(graph.layer_outputs[layer.name])

    def clone(layer):
        config = layer.get_config()
        if layer.name in graph.layer_inputs:
            config = handler_for(layer).config(layer, config, *masks(layer))
        return layer.__class__.from_config(config)

    pruned = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights and layer.name in graph.layer_inputs:
            pruned.get_layer(layer.name).set_weights(handler_for(layer).weights(layer, weights, *masks(layer)))
    if name:
        pruned._name = name
    history = {}
    for producer, ids in graph.producers.items():
        kept = keep(ids)
        if not kept.all():
            history[producer] = np.flatnonzero(kept).tolist()
    return pruned, history


def compose_history(previous: Optional[History], current: History) -> History:
    """The history of two prunings in a row, in terms of the original model."""
    if not previous:
        return {k: list(v) for k, v in current.items()}
    out = {k: list(v) for k, v in previous.items()}
    for name, kept in current.items():
        base = previous.get(name)
        out[name] = [base[i] for i in kept] if base is not None else list(kept)
    return out


def units_from_history(graph: ChannelGraph, history: History) -> List[int]:
    """The units a history removes from the model of ``graph``.

    Raises:
        ValueError: unknown layer, index out of range, or a history that splits a unit (it keeps
            some channels that must go together with removed ones, e.g. an odd number of the
            channels of a layer that a ``[route] groups=2`` splits in two).
    """
    removed = set()
    for name, kept in history.items():
        if name not in graph.producers:
            raise ValueError(f"pruning history names layer {name!r}, which has no prunable filters in this model")
        ids = graph.producers[name]
        bad = [i for i in kept if not 0 <= int(i) < len(ids)]
        if bad:
            raise ValueError(f"pruning history: layer {name} has {len(ids)} filters; index {bad[0]} is out of range")
        gone = np.ones(len(ids), bool)
        gone[np.asarray(kept, dtype=np.int64)] = False
        removed.update(graph.sets.find(int(i)) for i in ids[gone])
    keep = graph.keep_masks(removed)
    for name, ids in graph.producers.items():
        expected = history.get(name, list(range(len(ids))))
        if np.flatnonzero(keep(ids)).tolist() != sorted(int(i) for i in expected):
            raise ValueError(f"pruning history: the channels kept in layer {name} split channels that "
                             f"must be removed together (a residual addition, a reorg block or the slices of a "
                             f"channel split)")
    return sorted(removed)


def apply_history(model, history: History):
    """Replay a pruning history on the dense model; returns the pruned model."""
    graph = ChannelGraph(model)
    return remove_units(model, graph, units_from_history(graph, history))[0]


def silence_channels(model, graph: ChannelGraph, removed_roots: Sequence[int]) -> None:
    """Zero, in place, the filters, biases and batch-norm scales and offsets of the removed
    channels, so that they output exactly zero: the dense model then computes what the pruned one
    does (the equivalence the tests check)."""
    keep = graph.keep_masks(removed_roots)
    for layer in model.layers:
        if layer.name not in graph.layer_inputs or not layer.weights:
            continue
        handler = handler_for(layer)
        drop_out = ~keep(graph.layer_outputs[layer.name])
        drop_in = ~keep(graph.layer_inputs[layer.name][0])
        weights = layer.get_weights()
        if isinstance(handler, Producer):
            weights[0][..., drop_out] = 0
            for w in weights[1:]:
                w[drop_out] = 0
        elif isinstance(handler, Depthwise):
            weights[0][:, :, drop_in, :] = 0
            for w in weights[1:]:
                w[drop_out] = 0
        elif isinstance(handler, PerChannel):
            gamma_beta = [w for w, v in zip(weights, layer.weights) if "gamma" in v.name or "beta" in v.name]
            for w in gamma_beta:
                w[drop_in] = 0
        layer.set_weights(weights)
