"""Channel dependency groups of a tf_keras functional model.

Every output channel of a *producer* (Conv2D, Dense) gets an integer id. Walking the model's nodes
in order, each tensor is described by the ids of its channels (its last axis): layers that keep
channels (batch norm, activations, pooling, padding, upsampling) pass the ids on, a concatenation
joins them, a reorg repeats them, a flatten tiles them, a channel slice (the AlexeyAB fork's CSP
split) takes one part of them and ties the parts together, a reshape keeps, tiles or folds them, and
RoIAlign passes the channels of the feature maps it pools from (tied across the maps) to its output. Layers that add or multiply tensors couple
the channels they combine: channel i of every input must be removed together, which a union-find
over ids records. What the surgeon removes is therefore a *unit* (a union-find class of ids: one
filter, or filters that must go together), and the producers linked by shared units form a *group*
(one layer, or several layers tied by residual additions).

Channels that may not go are *protected*, each with a reason: the model inputs, the channels
reaching a model output (detection heads never lose outputs), and everything feeding a layer this
module does not know (reported, never silently cut).

How each layer type maps channels lives in :data:`HANDLERS`, looked up along the layer's class
hierarchy; :mod:`kprune.prune.surgeon` uses the same handlers to rebuild and slice the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from kprune._keras import keras, tf
from kprune.models.layers import ChannelSlice, DetectionHead, L2Normalization, MultiBoxHead, RCNNHead, Reorg
from kprune.models.roi import Proposals, RoIAlign


class UnionFind:
    """Union-find over integer ids that grow on demand."""

    def __init__(self):
        self.parent: List[int] = []

    def add(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(i)) for i in ids], dtype=np.int64)


@dataclass
class Unit:
    """Channels that are removed together: ``members`` maps producer name -> channel indices."""

    root: int
    members: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Channels the unit takes from each producer (the most from any one)."""
        return max(len(v) for v in self.members.values())


@dataclass
class Group:
    """Producers whose channels are coupled, and the prunable units they share."""

    name: str
    producers: List[str]
    units: List[Unit]
    protected_units: int = 0


class Handler:
    """How one layer type maps channel ids (and, for the surgeon, how it is rebuilt and sliced).

    ``propagate`` returns the ids of the layer's output channels from the ids of its inputs and may
    couple or protect ids through ``graph``. ``config`` returns the layer's config for the kept
    channels (``in_keep``: one boolean mask per input, ``out_keep``: a mask over the output);
    ``weights`` returns the layer's weights cut to the kept channels.
    """

    def propagate(self, layer, inputs: List[np.ndarray], graph: "ChannelGraph") -> np.ndarray:
        raise NotImplementedError

    def config(self, layer, config: dict, in_keep: List[np.ndarray], out_keep: np.ndarray) -> dict:
        return config

    def weights(self, layer, weights: List[np.ndarray], in_keep, out_keep) -> List[np.ndarray]:
        return weights


class PassThrough(Handler):
    """Channel i out is channel i in (activations, pooling, padding, upsampling, dropout)."""

    def propagate(self, layer, inputs, graph):
        return inputs[0]


class PerChannel(PassThrough):
    """Pass-through with one value per channel in every weight (batch normalization)."""

    def weights(self, layer, weights, in_keep, out_keep):
        return [w[in_keep[0]] for w in weights]


class Producer(Handler):
    """Conv2D and Dense: consume their input channels, produce fresh ones (prunable)."""

    count_key = "filters"

    def propagate(self, layer, inputs, graph):
        return graph.new_channels(layer.name, int(layer.get_config()[self.count_key]), producer=True)

    def config(self, layer, config, in_keep, out_keep):
        return {**config, self.count_key: int(out_keep.sum())}

    def weights(self, layer, weights, in_keep, out_keep):
        kernel = weights[0][..., in_keep[0], :][..., out_keep]
        return [kernel] + [w[out_keep] for w in weights[1:]]


class DenseProducer(Producer):
    count_key = "units"


class Conv(Producer):
    """Conv2D; grouped convolutions are not handled (their inputs are protected)."""

    def propagate(self, layer, inputs, graph):
        if getattr(layer, "groups", 1) != 1:
            return UNKNOWN.propagate(layer, inputs, graph, why=f"grouped convolution (groups={layer.groups})")
        return super().propagate(layer, inputs, graph)


class Depthwise(Handler):
    """DepthwiseConv2D with multiplier m: output channel c*m + j comes from input channel c."""

    def propagate(self, layer, inputs, graph):
        return np.repeat(inputs[0], layer.depth_multiplier)

    def weights(self, layer, weights, in_keep, out_keep):
        kernel = weights[0][:, :, in_keep[0], :]
        return [kernel] + [w[out_keep] for w in weights[1:]]


class Elementwise(Handler):
    """Add, Subtract, Multiply, Average, Maximum, Minimum: channel i of every input is coupled."""

    def propagate(self, layer, inputs, graph):
        full = [ids for ids in inputs if len(ids) > 1] or inputs
        first = full[0]
        for other in full[1:]:
            if len(other) != len(first):
                return UNKNOWN.propagate(layer, inputs, graph, why="inputs of different channel counts")
            for a, b in zip(first, other):
                graph.union(a, b)
        return first


class Concat(Handler):
    """Concatenate on the channel axis: the inputs' channels one after the other. On another axis
    (Faster R-CNN joins its levels' anchors on axis 1) channel c of every input becomes channel c of
    the output, so channel c of every input is tied, as in an addition."""

    def propagate(self, layer, inputs, graph):
        rank = len(layer.output_shape)
        if layer.axis in (-1, rank - 1):
            return np.concatenate(inputs)
        if layer.axis in (0, -rank):
            return UNKNOWN.propagate(layer, inputs, graph, why="concatenation on the batch axis")
        if any(len(ids) != len(inputs[0]) for ids in inputs[1:]):
            return UNKNOWN.propagate(layer, inputs, graph, why="inputs of different channel counts")
        for other in inputs[1:]:
            for a, b in zip(inputs[0], other):
                graph.union(a, b)
        return inputs[0]


class ReorgHandler(Handler):
    """Reorg with stride s: input channel c of C feeds output channels c, C+c, ..., (s²-1)C+c, in
    both modes. Darknet's exact reorg also lays channel c out spatially by c mod s², so channels are
    removed in aligned blocks of s² (kept channels keep their residue); space_to_depth needs no such
    coupling."""

    def propagate(self, layer, inputs, graph):
        ids = inputs[0]
        block = layer.stride ** 2
        if layer.mode == "darknet":
            for start in range(0, len(ids), block):
                for other in ids[start + 1: start + block]:
                    graph.union(ids[start], other)
        return np.tile(ids, block)


class SliceHandler(Handler):
    """ChannelSlice ``group_id`` of ``groups`` (AlexeyAB's ``[route] groups= group_id=``, the CSP
    split): output channel k is input channel ``group_id * C / groups + k``.

    The layer slices by position, so the pruned input must still split into ``groups`` equal slices,
    and the slice it takes must hold exactly the kept channels of the dense slice. The rule chosen:
    channel k of every slice is tied to channel k of every other slice (one unit holds input
    channels k, C/G + k, ..., (G-1)C/G + k), so a removal takes the same positions out of all
    slices. That is the only rule that keeps the slices equal whatever the criterion picks, and the
    only one under which the other slices (usually a concatenation that keeps the whole producer,
    as in YOLOv4-tiny) still line up channel for channel with the dense model. The price is that
    the producer of a split loses channels in pairs (units of width G). The layer stores no channel
    count, so its config needs no rewriting.

    Raises:
        ValueError: an input channel count that is not a multiple of ``groups`` (the message names
            the layer).
    """

    def propagate(self, layer, inputs, graph):
        ids = inputs[0]
        if len(ids) % layer.groups:
            raise ValueError(f"layer {layer.name}: {len(ids)} channels do not split into groups={layer.groups} "
                             "equal slices; a channel split needs a multiple of groups")
        slices = ids.reshape(layer.groups, -1)
        for other in slices[1:]:
            for a, b in zip(slices[0], other):
                graph.union(a, b)
        return slices[layer.group_id]


class FlattenHandler(Handler):
    """Flatten of (..., C) channels-last: position p * C + c holds channel c."""

    def propagate(self, layer, inputs, graph):
        positions = int(np.prod(layer.input_shape[1:-1])) if len(layer.input_shape) > 2 else 1
        if layer.data_format != "channels_last" or positions <= 0:
            return UNKNOWN.propagate(layer, inputs, graph, why="not a channels-last flatten of a known shape")
        return np.tile(inputs[0], positions)


class ReshapeHandler(Handler):
    """Reshape (channels last): the values keep their memory order, so the channel of a value is
    its flat index modulo the channel count. Three cases map channels cleanly:

    - the last axis keeps its size C (only the other axes are regrouped, e.g. (N, H, W, C) ->
      (N, H W, C)): channel c stays channel c;
    - the last axis grows to m C (a per-item flatten, e.g. RoIAlign's (N, K, 7, 7, C) ->
      (N, K, 49 C)): position p * C + c holds channel c, as in a flatten;
    - the last axis shrinks to C / m (e.g. (N, H, W, 3 * 4) -> (N, H W 3, 4)): channel k holds input
      channels k, C/m + k, ...: those are tied, as one unit.

    Any other reshape is unknown (its inputs protected). The config's target shape gets the kept
    channel count on its last axis (unless that axis is -1, which Keras infers).
    """

    def propagate(self, layer, inputs, graph):
        ids = inputs[0]
        out = layer.output_shape[-1] if len(layer.output_shape) > 1 else None
        if not out or not len(ids):
            return UNKNOWN.propagate(layer, inputs, graph, why="a reshape of an unknown shape")
        if out % len(ids) == 0:
            return np.tile(ids, out // len(ids))
        if len(ids) % out == 0:
            folded = ids.reshape(-1, out)
            for other in folded[1:]:
                for a, b in zip(folded[0], other):
                    graph.union(a, b)
            return folded[0]
        return UNKNOWN.propagate(layer, inputs, graph, why=f"{len(ids)} channels regrouped into {out}")

    def config(self, layer, config, in_keep, out_keep):
        target = list(config["target_shape"])
        if target and target[-1] != -1:
            target[-1] = int(out_keep.sum())
        return {**config, "target_shape": tuple(target)}


class RoIAlignHandler(Handler):
    """RoIAlign on ``[p2, p3, ..., boxes]``: output channel c is channel c of whichever map a box is
    pooled from, so channel c of every map is tied (one unit) and passes to the output; the boxes
    (coordinates, not channels) are left alone."""

    def propagate(self, layer, inputs, graph):
        *maps, _ = inputs
        for other in maps[1:]:
            if len(other) != len(maps[0]):
                return UNKNOWN.propagate(layer, inputs, graph, why="feature maps of different channel counts")
            for a, b in zip(maps[0], other):
                graph.union(a, b)
        return maps[0]


class Consumer(Handler):
    """A layer that reads its inputs whole and makes something else of them (Faster R-CNN's
    :class:`~kprune.models.roi.Proposals`: RPN outputs -> boxes): every channel feeding it is
    protected, its output channels are new and protected."""

    def propagate(self, layer, inputs, graph):
        for ids in inputs:
            graph.protect(ids, f"feeds {layer.name} ({type(layer).__name__}), which reads it whole")
        return graph.new_channels(layer.name, int(layer.output_shape[-1]), protect=f"output of {layer.name}")


class Unknown(Handler):
    """A layer the surgeon does not know: the channels feeding it are protected, and its output
    channels are new, protected ids."""

    def propagate(self, layer, inputs, graph, why: Optional[str] = None):
        reason = f"feeds {layer.name} ({type(layer).__name__}"
        reason += f": {why})" if why else ", a layer type the surgeon does not handle)"
        for ids in inputs:
            graph.protect(ids, reason)
        graph.unhandled[layer.name] = why or f"{type(layer).__name__} is not handled"
        shape = layer.output_shape
        channels = shape[-1] if isinstance(shape, tuple) else 0
        return graph.new_channels(layer.name, int(channels or 0), protect=f"output of {layer.name}")


UNKNOWN = Unknown()


class Output(Handler):
    """A head layer that joins several predictions into the model's output (SSD's MultiBoxHead):
    every channel feeding it reaches the output, so it is protected; its output channels are new."""

    def propagate(self, layer, inputs, graph):
        for ids in inputs:
            graph.protect(ids, f"feeds the detection output {layer.name}")
        shape = layer.output_shape
        return graph.new_channels(layer.name, int(shape[-1]), protect=f"output of {layer.name}")


class MultiOutput(Handler):
    """A head layer with several outputs (Faster R-CNN's :class:`RCNNHead`): every channel feeding it
    reaches a model output, so it is protected; each output gets new, protected channels.
    ``propagate`` returns one id array per output."""

    multi_output = True

    def propagate(self, layer, inputs, graph):
        for ids in inputs:
            graph.protect(ids, f"feeds the detection output {layer.name}")
        shapes = layer.output_shape if isinstance(layer.output_shape, list) else [layer.output_shape]
        return [graph.new_channels(layer.name, int(shape[-1]), protect=f"output of {layer.name}") for shape in shapes]


class Activation(PassThrough):
    """An ``Activation`` layer keeps channels apart unless it is a softmax over them."""

    def propagate(self, layer, inputs, graph):
        name = getattr(layer.activation, "__name__", str(layer.activation))
        if "softmax" in name:
            return UNKNOWN.propagate(layer, inputs, graph, why=f"{name} mixes channels")
        return inputs[0]


L = keras.layers
#: layer class -> handler; a layer uses the entry of the nearest class in its hierarchy
HANDLERS: Dict[type, Handler] = {
    L.Conv2D: Conv(),
    L.Conv2DTranspose: UNKNOWN,  # a Conv2D subclass whose kernel is laid out (k, k, out, in)
    L.Dense: DenseProducer(),
    L.DepthwiseConv2D: Depthwise(),
    L.BatchNormalization: PerChannel(),
    L.Activation: Activation(),
    L.Concatenate: Concat(),
    L.Flatten: FlattenHandler(),
    L.Reshape: ReshapeHandler(),
    Reorg: ReorgHandler(),
    RoIAlign: RoIAlignHandler(),
    Proposals: Consumer(),
    RCNNHead: MultiOutput(),
    ChannelSlice: SliceHandler(),
    DetectionHead: PassThrough(),
    MultiBoxHead: Output(),
    L2Normalization: PerChannel(),  # a removed channel is silent, so it adds nothing to the norm
    **{cls: PassThrough() for cls in (
        L.LeakyReLU, L.ReLU, L.ELU, L.ZeroPadding2D, L.MaxPooling2D, L.AveragePooling2D,
        L.GlobalAveragePooling2D, L.GlobalMaxPooling2D, L.UpSampling2D, L.Dropout, L.SpatialDropout2D,
        L.Cropping2D, L.Rescaling)},
    **{cls: Elementwise() for cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)},
}


def handler_for(layer) -> Handler:
    """The handler of the nearest class in ``layer``'s hierarchy (:data:`UNKNOWN` if none)."""
    for cls in type(layer).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return UNKNOWN


class ChannelGraph:
    """The channel ids of every tensor of ``model``, their couplings and protections.

    Attributes:
        producers: producer layer name -> ids of its output channels (model order).
        layer_inputs: layer name -> ids of the channels of each of its inputs (first call).
        layer_outputs: layer name -> ids of its output channels (of a layer with several outputs,
            those of every output one after the other).
        protected: protected id -> reason (see :meth:`protection`).
        unhandled: layers the surgeon does not know -> why; the convs feeding them are protected.
    """

    def __init__(self, model):
        if not getattr(model, "_is_graph_network", False):
            raise ValueError(f"model {model.name!r} is not a functional model; the surgeon needs its layer graph")
        self.model = model
        self.sets = UnionFind()
        self.owner: List[tuple] = []  # id -> (producer name or None, index)
        self.producers: Dict[str, np.ndarray] = {}
        self.layer_inputs: Dict[str, List[np.ndarray]] = {}
        self.layer_outputs: Dict[str, np.ndarray] = {}
        self.protected: Dict[int, str] = {}
        self.unhandled: Dict[str, str] = {}
        self._trace()

    # -- building -------------------------------------------------------------------------------
    def new_channels(self, name: str, count: int, producer: bool = False, protect: Optional[str] = None):
        ids = self.sets.add(count)
        self.owner.extend((name if producer else None, i) for i in range(count))
        if producer:
            self.producers[name] = ids
        if protect:
            self.protect(ids, protect)
        return ids

    def union(self, a, b) -> None:
        self.sets.union(int(a), int(b))

    def protect(self, ids: np.ndarray, reason: str) -> None:
        for i in ids:
            self.protected.setdefault(int(i), reason)

    def _trace(self) -> None:
        tensors: Dict[int, np.ndarray] = {}
        per_output: Dict[str, List[np.ndarray]] = {}
        for tensor, layer in zip(self.model.inputs, self.model._input_layers):
            ids = self.new_channels(layer.name, int(tensor.shape[-1]), protect="model input")
            tensors[id(tensor)] = ids
            self.layer_outputs[layer.name] = ids
        for depth in sorted(self.model._nodes_by_depth, reverse=True):
            for node in self.model._nodes_by_depth[depth]:
                layer = node.layer
                if node.is_input:
                    continue
                inputs = [tensors[id(t)] for t in node.keras_inputs]
                outputs = tf.nest.flatten(node.outputs)
                seen = self.layer_inputs.get(layer.name)
                if seen is not None:  # a shared layer: every call must lose the same channels
                    for before, now in zip(seen, inputs):
                        for a, b in zip(before, now):
                            self.union(a, b)
                    results = per_output[layer.name]
                else:
                    self.layer_inputs[layer.name] = inputs
                    handler = handler_for(layer)
                    if len(outputs) == 1:
                        results = [handler.propagate(layer, inputs, self)]
                    elif getattr(handler, "multi_output", False):
                        results = list(handler.propagate(layer, inputs, self))
                    else:
                        results = [UNKNOWN.propagate(layer, inputs, self, why="several outputs")] * len(outputs)
                    per_output[layer.name] = results
                    self.layer_outputs[layer.name] = results[0] if len(results) == 1 else np.concatenate(results)
                for tensor, result in zip(outputs, results):
                    tensors[id(tensor)] = result
        for tensor in tf.nest.flatten(self.model.outputs):
            self.protect(tensors[id(tensor)], "reaches a model output")

    # -- queries --------------------------------------------------------------------------------
    def protection(self) -> Dict[int, str]:
        """Root id -> reason, for every unit with a protected member."""
        roots: Dict[int, str] = {}
        for i, reason in self.protected.items():
            roots.setdefault(self.sets.find(i), reason)
        return roots

    def units(self) -> Dict[int, Unit]:
        """Every unit that holds producer channels, by root id (protected ones included)."""
        found: Dict[int, Unit] = {}
        for name, ids in self.producers.items():
            for index, i in enumerate(ids):
                root = self.sets.find(int(i))
                found.setdefault(root, Unit(root)).members.setdefault(name, []).append(index)
        return found

    def groups(self) -> List[Group]:
        """Producers tied by shared units, each group with its prunable units, in model order.
        A group with no prunable unit is still listed (with ``protected_units``)."""
        units = self.units()
        protection = self.protection()
        order = {name: k for k, name in enumerate(self.producers)}
        linked = UnionFind()
        linked.add(len(order))
        for unit in units.values():
            names = list(unit.members)
            for other in names[1:]:
                linked.union(order[names[0]], order[other])
        by_root: Dict[int, Group] = {}
        for name in self.producers:
            root = linked.find(order[name])
            by_root.setdefault(root, Group(name, [], [])).producers.append(name)
        for unit in sorted(units.values(), key=lambda u: u.root):
            group = by_root[linked.find(order[next(iter(unit.members))])]
            if unit.root in protection:
                group.protected_units += 1
            else:
                group.units.append(unit)
        for group in by_root.values():
            if len(group.producers) > 1:
                group.name = "+".join(group.producers)
        return sorted(by_root.values(), key=lambda g: order[g.producers[0]])

    def protected_producers(self) -> Dict[str, str]:
        """Producer name -> why it keeps every channel, for producers with no prunable channel."""
        protection = self.protection()
        out = {}
        for name, ids in self.producers.items():
            reasons = [protection.get(self.sets.find(int(i))) for i in ids]
            if all(reasons):
                out[name] = reasons[0]
        return out

    def keep_masks(self, removed_roots: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
        """A function from channel ids to a boolean keep mask, for the given removed units."""
        removed = set(int(r) for r in removed_roots)
        cache: Dict[int, bool] = {}

        def keep(ids: np.ndarray) -> np.ndarray:
            out = np.empty(len(ids), bool)
            for k, i in enumerate(ids):
                i = int(i)
                if i not in cache:
                    cache[i] = self.sets.find(i) not in removed
                out[k] = cache[i]
            return out

        return keep
