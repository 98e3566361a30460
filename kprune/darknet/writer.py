"""Model -> Darknet cfg text: the cfg of a model built from a Darknet cfg, as the model now is.

The cfg is read back from the model itself, so it has the filters the model has after pruning
(:mod:`kprune.prune.surgeon`), width scaling or a new class count, and the input size it was built or
resized to. The builder's layer names (:mod:`kprune.darknet.builder`) give each Keras layer its cfg
index and section; a cfg index without a layer is a ``[route]`` of one layer, which the builder
makes no layer for. Every layer's type and settings are checked, so a model Darknet would compute
differently is an error naming the layer, not a wrong file.

What the model does not carry in its layers, the ``[net]`` section and the training keys of each
head (``jitter``, ``ignore_thresh``, ...), comes from the cfg text the builder stores in the heads
(:attr:`kprune.models.layers.DetectionHead.darknet_options`); models saved before it was stored get
a ``[net]`` section of the input size only, which Darknet's own defaults complete.

The sections are written as Darknet's cfgs are: ``[kind]``, then ``key=value`` lines, a blank line
between sections, one section per layer in order. Darknet ignores ``#`` comment lines; the comment
at the top says which Darknet computes the model exactly (the batch-norm formula,
:mod:`kprune.models.bn_formulas`).

This module does not import TensorFlow: it reads the model through its layers' class names and
configs, and the text generation (:func:`format_cfg`) takes plain Python values.
"""

from __future__ import annotations

import os
import re
import textwrap
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from kprune.darknet.cfg import FORK_ACTIVATIONS, FORK_KEYS, parse_cfg
from kprune.fileio import write_bytes_atomic
from kprune.models.bn_formulas import BN_FORMULAS

#: one section to write: its kind and its (key, value text) pairs in order
CfgSection = Tuple[str, List[Tuple[str, str]]]

_NAME = re.compile(r"^(?P<prefix>[a-z]+)_(?P<index>\d+)(?:_slice_(?P<slice>\d+))?$")
_ACTIVATION_PREFIXES = ("leaky", "relu", "logistic", "mish", "swish")
_LAYER_PREFIXES = ("conv", "pad", "bn", "maxpool", "route", "reorg", "shortcut", "upsample", "region", "yolo",
                   *_ACTIVATION_PREFIXES)
#: the fork's [yolo] keys with their Darknet defaults: written when they differ or the cfg had them
_YOLO_DEFAULTS = {"scale_x_y": 1.0, "new_coords": 0, "iou_loss": "mse", "iou_normalizer": 0.75,
                  "cls_normalizer": 1.0, "obj_normalizer": 1.0}


def _number(value) -> str:
    """A number as a cfg writes it: whole numbers without a decimal point, others in Python's
    shortest exact form (so anchors parsed from a cfg are written back as they were)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _numbers(values: Sequence) -> str:
    return ",".join(_number(v) for v in values)


def format_cfg(sections: Sequence[CfgSection], comments: Sequence[str] = ()) -> str:
    """The text of a cfg file: comment lines, then each section as ``[kind]`` and ``key=value``
    lines, sections separated by a blank line.

    Args:
        sections: (kind, [(key, value text), ...]) in file order, ``net`` first.
        comments: paragraphs written at the top, wrapped to 100 columns, each line behind ``# ``.

    Returns:
        The file's text, ending in a newline.

    Raises:
        ValueError: a key or value that would not read back as one ``key=value`` line (empty, or with
            ``=``, ``#``, ``;``, ``[`` or a line break where Darknet would split it).
    """
    lines = [f"# {line}".rstrip() for text in comments for line in textwrap.wrap(text, 98) or [""]]
    if lines:
        lines.append("")
    for kind, options in sections:
        lines.append(f"[{kind}]")
        for key, value in options:
            if (not key or not value or any(c in key for c in "=#;[\n") or any(c in value for c in "#;\n")
                    or key != key.strip()):
                raise ValueError(f"[{kind}]: {key}={value!r} cannot be written as a cfg line")
            lines.append(f"{key}={value}")
        lines.append("")
    return "\n".join(lines)


# ---- reading the model -------------------------------------------------------------------------


def _class_name(layer) -> str:
    return type(layer).__name__


def _fail(layer, message: str) -> ValueError:
    return ValueError(f"layer {layer.name} ({_class_name(layer)}): {message}")


def _config(layer) -> dict:
    return layer.get_config()


def _sources(layer) -> List[str]:
    """The names of the layers whose outputs ``layer`` takes, in order.

    Raises:
        ValueError: the layer is used more than once (its inputs are not defined).
    """
    try:
        inputs = layer.input
    except (AttributeError, RuntimeError) as exc:
        raise _fail(layer, f"its input is not one tensor or list of tensors ({exc})") from None
    tensors = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [t._keras_history.layer.name for t in tensors]


def _pair(layer, key: str) -> int:
    value = _config(layer)[key]
    values = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(values) != 2 or values[0] != values[1]:
        raise _fail(layer, f"{key}={value}: Darknet layers are square")
    return int(values[0])


def _check_activation(prefix: str, layer) -> None:
    """``layer`` must compute the Darknet activation its name says."""
    name, config = _class_name(layer), _config(layer)
    ok = {
        "leaky": lambda: name == "LeakyReLU" and abs(float(config.get("alpha", 0)) - 0.1) < 1e-6,
        "relu": lambda: name == "ReLU" and config.get("max_value") is None
        and float(config.get("negative_slope", 0)) == 0 and float(config.get("threshold", 0)) == 0,
        "logistic": lambda: name == "Activation" and config.get("activation") == "sigmoid",
        "mish": lambda: name == "Mish" or (name == "Activation" and config.get("activation") == "mish"),
        "swish": lambda: name == "Activation" and config.get("activation") in ("swish", "silu"),
    }[prefix]()
    if not ok:
        raise _fail(layer, f"is not Darknet's {prefix} activation its name says")


class _Block:
    """The Keras layers of one cfg index, by name prefix (``slices``: route_i_slice_k in k order)."""

    def __init__(self, index: int):
        self.index = index
        self.layers: Dict[str, object] = {}
        self.slices: Dict[int, object] = {}

    def activation(self) -> Tuple[str, Optional[object]]:
        found = [(p, self.layers[p]) for p in _ACTIVATION_PREFIXES if p in self.layers]
        if len(found) > 1:
            raise _fail(found[1][1], f"layer {self.index} has two activations ({found[0][1].name})")
        for prefix, layer in found:
            _check_activation(prefix, layer)
        return found[0] if found else ("linear", None)


def _blocks(model) -> Dict[int, _Block]:
    """The model's layers grouped by cfg index.

    Raises:
        ValueError: a layer whose name or type the builder does not make (the model was not built
            from a Darknet cfg).
    """
    blocks: Dict[int, _Block] = {}
    for layer in model.layers:
        if _class_name(layer) == "InputLayer":
            continue
        match = _NAME.match(layer.name)
        if match is None or match["prefix"] not in _LAYER_PREFIXES or (match["slice"] and match["prefix"] != "route"):
            raise _fail(layer, f"model {model.name!r} was not built from a Darknet cfg (kprune.darknet.builder "
                               "names its layers conv_N, bn_N, leaky_N, maxpool_N, route_N, yolo_N, ...), so it "
                               "has no Darknet cfg")
        block = blocks.setdefault(int(match["index"]), _Block(int(match["index"])))
        if match["slice"] is not None:
            block.slices[int(match["slice"])] = layer
        elif match["prefix"] in block.layers:
            raise _fail(layer, f"two layers of cfg index {block.index} are called {match['prefix']}")
        else:
            block.layers[match["prefix"]] = layer
    if not blocks:
        raise ValueError(f"model {model.name!r} has no layers, so it has no Darknet cfg")
    return blocks


_KIND_OF_PREFIX = {"conv": "convolutional", "maxpool": "maxpool", "reorg": "reorg", "shortcut": "shortcut",
                   "upsample": "upsample", "region": "region", "yolo": "yolo", "route": "route"}
# the layers each kind may have besides its own, in computation order
_PARTS = {"convolutional": ("pad", "conv", "bn", *_ACTIVATION_PREFIXES), "shortcut": ("shortcut", *_ACTIVATION_PREFIXES)}


def _kind(block: _Block) -> str:
    """The section kind of a block.

    Raises:
        ValueError: layers that do not make one Darknet layer together.
    """
    main = [p for p in block.layers if p in _KIND_OF_PREFIX]
    any_layer = next(iter(block.layers.values()), None) or next(iter(block.slices.values()))
    if block.slices and not main:
        raise _fail(any_layer, f"route slices of layer {block.index} without their concatenation route_{block.index}")
    if len(main) != 1:
        raise _fail(any_layer, f"cfg index {block.index} has layers of several Darknet layers: "
                               + ", ".join(layer.name for layer in block.layers.values()))
    kind = _KIND_OF_PREFIX[main[0]]
    allowed = _PARTS.get(kind, (main[0],))
    extra = [layer for prefix, layer in block.layers.items() if prefix not in allowed]
    if extra:
        raise _fail(extra[0], f"does not belong to a Darknet [{kind}] (layer {block.index})")
    if block.slices and kind != "route":
        raise _fail(next(iter(block.slices.values())), f"a route slice at the [{kind}] of layer {block.index}")
    return kind


def _chain(block: _Block, order: Sequence[str]) -> Tuple[object, object]:
    """Check that the present layers of ``order`` each take the previous one's output; returns
    (first layer, last layer)."""
    present = [block.layers[p] for p in order if p in block.layers]
    for before, after in zip(present, present[1:]):
        if _sources(after) != [before.name]:
            raise _fail(after, f"does not take the output of {before.name}, as a Darknet layer {block.index} would")
    return present[0], present[-1]


def _conv_options(block: _Block, input_size: Tuple[int, int]) -> Tuple[List[Tuple[str, str]], str]:
    """A [convolutional]'s options and its batch-norm formula (or '' without batch norm)."""
    conv = block.layers["conv"]
    config = _config(conv)
    if _class_name(conv) != "Conv2D":
        raise _fail(conv, "Darknet's [convolutional] is a plain Conv2D")
    k, stride = _pair(conv, "kernel_size"), _pair(conv, "strides")
    if _pair(conv, "dilation_rate") != 1 or int(config.get("groups", 1)) != 1:
        raise _fail(conv, "dilated and grouped convolutions have no Darknet cfg here")
    if config.get("activation") not in ("linear", None):
        raise _fail(conv, f"activation {config.get('activation')!r} inside the conv; Darknet activations are "
                          "separate layers (leaky_N, ...)")
    if config.get("data_format", "channels_last") != "channels_last":
        raise _fail(conv, "only channels_last models")
    bn = block.layers.get("bn")
    formula = ""
    if bn is not None:
        bn_config = _config(bn)
        if _class_name(bn) != "DarknetBatchNormalization":
            raise _fail(bn, "Darknet's batch norm is a DarknetBatchNormalization (Keras' own uses another formula)")
        formula = bn_config["formula"]
        if abs(float(bn_config["epsilon"]) - BN_FORMULAS[formula].epsilon) > 1e-12:
            raise _fail(bn, f"epsilon {bn_config['epsilon']} is not the {formula} formula's "
                            f"{BN_FORMULAS[formula].epsilon}, which Darknet uses")
        if config["use_bias"]:
            raise _fail(conv, "a conv with both a bias and a batch norm (Darknet's batch norm holds the bias)")
    elif not config["use_bias"]:
        raise _fail(conv, "a conv with neither a bias nor a batch norm")
    pad_layer = block.layers.get("pad")
    if pad_layer is not None:
        (top, bottom), (left, right) = _config(pad_layer)["padding"]
        if config["padding"] != "valid" or (top, left) != (left, top) or top != left:
            raise _fail(pad_layer, f"padding {((top, bottom), (left, right))} is not Darknet's (the same on top "
                                   "and left, before a valid conv)")
        # Darknet pads `top` pixels and reads as far as the strides take it: the builder's bottom/right
        for size, end in zip(input_size, (bottom, right)):
            out = (size + 2 * top - k) // stride + 1
            if end != max(0, (out - 1) * stride + k - size - top):
                raise _fail(pad_layer, f"padding {((top, bottom), (left, right))} on a {input_size} input is not "
                                       f"Darknet's padding of {top}")
        pad = top
    elif config["padding"] == "same":
        if not (stride == 1 and k % 2 == 1):
            raise _fail(conv, f"'same' padding of a size {k} stride {stride} conv differs from Darknet's")
        pad = k // 2
    else:
        pad = 0
    options = [("batch_normalize", "1")] if bn is not None else []
    options += [("filters", str(int(config["filters"]))), ("size", str(k)), ("stride", str(stride))]
    options += [("pad", "1")] if pad == k // 2 else [("pad", "0")] + ([("padding", str(pad))] if pad else [])
    options.append(("activation", block.activation()[0]))
    return options, formula


def _maxpool_options(layer, input_size: Tuple[int, int]) -> List[Tuple[str, str]]:
    if _class_name(layer) != "MaxPooling2D":
        raise _fail(layer, "Darknet's [maxpool] is a MaxPooling2D")
    k, stride, padding = _pair(layer, "pool_size"), _pair(layer, "strides"), _config(layer)["padding"]
    pad = 0 if padding == "valid" else k - 1
    # Darknet pads `pad` pixels, pad // 2 of them on the top/left; check Keras pads the same way here
    for size in input_size:
        darknet_out = (size + pad - k) // stride + 1
        if padding == "same":
            out = -(-size // stride)
            left = max((out - 1) * stride + k - size, 0) // 2
        else:
            out, left = (size - k) // stride + 1, 0
        if (darknet_out, pad // 2) != (out, left):
            raise _fail(layer, f"{padding!r} pooling of size {k} stride {stride} on a {size}-pixel input is not "
                               f"Darknet's (padding={pad})")
    options = [("size", str(k)), ("stride", str(stride))]
    return options + ([("padding", str(pad))] if pad != k - 1 else [])


def _head_options(layer, kind: str) -> List[Tuple[str, str]]:
    """A [region] / [yolo] section: the model's values of the keys the head carries, the cfg's text
    of the others, in the cfg's order."""
    if _class_name(layer) != "DetectionHead" or getattr(layer, "kind", None) != kind:
        raise _fail(layer, f"Darknet's [{kind}] is a DetectionHead of kind {kind}")
    pairs = [f"{_number(w)},{_number(h)}" for w, h in layer.anchors]
    carried = {"anchors": ",  ".join(pairs), "classes": str(layer.classes), "num": str(len(layer.anchors))}
    required = ["anchors", "classes", "num"]
    defaults: Dict[str, object] = {}
    if kind == "region":
        carried.update(coords="4", softmax="1")
        required.append("softmax")  # Darknet's default is 0; kprune's region heads are softmax heads
    else:
        carried["mask"] = _numbers(layer.mask)
        required.append("mask")
        values = {"scale_x_y": layer.scale_x_y, "new_coords": layer.new_coords, **(layer.loss_settings or {})}
        for key, value in values.items():
            if key in _YOLO_DEFAULTS:
                carried[key] = value if isinstance(value, str) else _number(value)
                defaults[key] = _YOLO_DEFAULTS[key]
    written = dict((getattr(layer, "darknet_options", None) or {}).get("section", {}))
    options = [(key, carried.get(key, value)) for key, value in written.items()]
    for key, value in carried.items():
        if key in written:
            continue
        default = defaults.get(key)
        differs = default is None or (value != default if isinstance(default, str) else float(value) != default)
        # a fork key at its default stays out: pjreddie's Darknet would warn about it, and kprune would
        # take the file for one of the fork's
        if key in required or (key in defaults and differs):
            options.append((key, value))
    return options


def _net_options(model, heads: Sequence) -> List[Tuple[str, str]]:
    shapes = model.input_shape
    if isinstance(shapes, list) or len(shapes) != 4 or None in shapes[1:]:
        raise ValueError(f"model {model.name!r}: input shape {shapes}; a Darknet model has one image input of fixed "
                         "size")
    _, height, width, channels = shapes
    carried = {"width": str(width), "height": str(height), "channels": str(channels)}
    written: Dict[str, str] = {}
    for head in heads:
        written = dict((getattr(head, "darknet_options", None) or {}).get("net", {}))
        if written:
            break
    options = [(key, carried.get(key, value)) for key, value in written.items()]
    return options + [(key, value) for key, value in carried.items() if key not in written]


def _output_name(index: int) -> str:
    return "the image" if index < 0 else f"the output of layer {index}"


def model_sections(model) -> Tuple[List[CfgSection], List[str]]:
    """The cfg sections of a model built from a Darknet cfg, ``net`` first, and the batch-norm
    formulas its layers use.

    Args:
        model: a model from :func:`kprune.darknet.builder.build_model`, possibly pruned, width-scaled,
            resized or saved and loaded since.

    Returns:
        ``(sections, formulas)``: the sections as :func:`format_cfg` takes them, and the sorted
        distinct formula names of its batch norms (empty without batch norm).

    Raises:
        ValueError: the model was not built from a Darknet cfg, or has a layer whose type, settings or
            inputs a Darknet cfg cannot express (the message names the layer).
    """
    blocks = _blocks(model)
    last = max(blocks)
    kinds = {i: _kind(b) for i, b in blocks.items()}
    input_names = {layer.name for layer in model.layers if _class_name(layer) == "InputLayer"}
    # the layer whose output is each block's output: what later layers take
    output_of: Dict[str, int] = {name: -1 for name in input_names}
    first_of: Dict[int, object] = {}
    for i, block in blocks.items():
        order = _PARTS.get(kinds[i])
        if order is None:
            layer = block.layers[next(p for p in block.layers)]
            first_of[i], final = layer, layer
        else:
            first_of[i], final = _chain(block, order)
        output_of[final.name] = i

    def index_of(layer, source: str) -> int:
        if source not in output_of:
            raise _fail(layer, f"takes the output of {source}, which is not the output of a Darknet layer (a "
                               "cfg can only refer to whole layers)")
        return output_of[source]

    def reference(layer, source: str, i: int) -> int:
        """A route's or shortcut's layer: Darknet refers only to layers before the referring one."""
        j = index_of(layer, source)
        if not 0 <= j < i:
            raise _fail(layer, f"takes {_output_name(j)}; a Darknet layer {i} can only refer to layers 0..{i - 1}")
        return j

    # the layer each block takes as "the previous layer's output" (Darknet's implicit input)
    sequential: Dict[int, int] = {}
    for i, kind in kinds.items():
        if kind == "route":
            continue
        sources = _sources(first_of[i])
        if kind == "shortcut" and len(sources) != 2:
            raise _fail(first_of[i], f"adds {len(sources)} layers; Darknet's [shortcut] adds two")
        if kind != "shortcut" and len(sources) != 1:
            raise _fail(first_of[i], f"takes {len(sources)} inputs; a Darknet [{kind}] takes one")
        sequential[i] = index_of(first_of[i], sources[0])
    # a cfg index without layers is a route of one layer: the builder passes that layer's output on
    repeats: Dict[int, int] = {}
    for i in range(last + 1):
        if i in blocks:
            continue
        if i + 1 not in sequential:
            raise ValueError(f"layer {i} of model {model.name!r} has no Keras layer and layer {i + 1} does not "
                             "take its output, so which layer its [route] repeats is unknown")
        repeats[i] = sequential[i + 1]

    def canonical(i: int) -> int:
        return repeats.get(i, i)

    sections: List[CfgSection] = []
    formulas = set()
    heads = []
    for i in range(last + 1):
        if i in repeats:
            if not 0 <= repeats[i] < i:
                raise ValueError(f"model {model.name!r}: layer {i + 1} takes {_output_name(repeats[i])}, which a "
                                 f"[route] at index {i} cannot repeat")
            sections.append(("route", [("layers", str(repeats[i] - i))]))
            continue
        kind, block = kinds[i], blocks[i]
        first = first_of[i]
        if kind != "route" and sequential[i] != canonical(i - 1):
            raise _fail(first, f"takes {_output_name(sequential[i])}, but a Darknet [{kind}] at index {i} takes "
                               f"{_output_name(i - 1)}")
        if kind in ("convolutional", "maxpool"):
            size = tuple(int(v) for v in first.input_shape[1:3])
        if kind == "convolutional":
            options, formula = _conv_options(block, size)
            if formula:
                formulas.add(formula)
        elif kind == "maxpool":
            options = _maxpool_options(first, size)
        elif kind == "reorg":
            if _class_name(first) != "Reorg" or _config(first)["mode"] != "darknet":
                raise _fail(first, "only a Reorg in mode 'darknet' is Darknet's [reorg] (space_to_depth orders "
                                   "the channels differently)")
            options = [("stride", str(int(_config(first)["stride"])))]
        elif kind == "upsample":
            if _class_name(first) != "UpSampling2D" or _config(first).get("interpolation", "nearest") != "nearest":
                raise _fail(first, "Darknet's [upsample] is a nearest-neighbour UpSampling2D")
            options = [("stride", str(_pair(first, "size")))]
        elif kind == "shortcut":
            if _class_name(first) != "Add":
                raise _fail(first, "Darknet's [shortcut] is an Add")
            other = reference(first, _sources(first)[1], i)
            options = [("from", str(other - i)), ("activation", block.activation()[0])]
        elif kind == "route":
            options = _route_options(block, i, reference)
        else:
            heads.append(first)
            options = _head_options(first, kind)
        sections.append((kind, options))
    _check_outputs(model, blocks)
    return [("net", _net_options(model, heads))] + sections, sorted(formulas)


def _route_options(block: _Block, i: int, reference: Callable) -> List[Tuple[str, str]]:
    route = block.layers["route"]
    if _class_name(route) == "ChannelSlice":
        if block.slices:
            raise _fail(route, "a channel slice route with slices of its own")
        slices, sources = [route], [reference(route, s, i) for s in _sources(route)]
    elif _class_name(route) == "Concatenate":
        if int(_config(route).get("axis", -1)) not in (-1, 3):
            raise _fail(route, "Darknet's [route] concatenates channels (axis -1)")
        names = _sources(route)
        slices = [block.slices[k] for k in sorted(block.slices)]
        if slices:
            if names != [s.name for s in slices]:
                raise _fail(route, f"concatenates {names}, not its slices route_{i}_slice_0, ... in order")
            sources = []
            for s in slices:
                if _class_name(s) != "ChannelSlice":
                    raise _fail(s, "a route slice is a ChannelSlice")
                sources += [reference(s, name, i) for name in _sources(s)]
        else:
            sources = [reference(route, name, i) for name in names]
    else:
        raise _fail(route, "Darknet's [route] is a Concatenate or a ChannelSlice")
    options = [("layers", ",".join(str(j - i) for j in sources))]
    if slices:
        settings = {(int(_config(s)["groups"]), int(_config(s)["group_id"])) for s in slices}
        if len(settings) != 1:
            raise _fail(route, f"its slices take different parts {sorted(settings)}; Darknet takes the same of each")
        groups, group_id = settings.pop()
        options += [("groups", str(groups)), ("group_id", str(group_id))]
    return options


def _check_outputs(model, blocks: Dict[int, _Block]) -> None:
    """Darknet's outputs are its detection layers (or its last layer): the model's must be the same."""
    heads = [b.layers[k] for i, b in sorted(blocks.items()) for k in ("region", "yolo") if k in b.layers]
    expected = [h.name for h in heads] if heads else None
    outputs = [t._keras_history.layer.name for t in model.outputs]
    if expected is not None and outputs != expected:
        raise ValueError(f"model {model.name!r} outputs {outputs}; its Darknet cfg outputs its detection layers "
                         f"{expected} in order")
    if expected is None and len(outputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(outputs)} outputs; a Darknet cfg without detection layers "
                         "outputs its last layer")


def _notes(text: str, formulas: Sequence[str], name: str) -> List[str]:
    """The comment lines at the top: what the file is and which Darknet computes the model exactly."""
    cfg = parse_cfg(text, source=name)
    fork = sorted({f"[{s.kind}] {key}" for s in [cfg.net, *cfg.layers] for key in FORK_KEYS.get(s.kind, ())
                   if key in s.raw} | {f"activation={s['activation']}" for s in cfg.layers
                                       if s.params.get("activation") in FORK_ACTIVATIONS})
    notes = [f"{name}: the Darknet cfg of the model as it is (its filters after any pruning or width "
             "scaling, its input size), written by kprune with the matching .weights file."]
    if len(formulas) > 1:
        notes.append("Its batch norms use different formulas (" + ", ".join(formulas) + "): no Darknet computes "
                     "it exactly.")
        return notes
    formula = formulas[0] if formulas else None
    if fork:
        notes.append("Uses features only AlexeyAB's fork of Darknet reads (" + ", ".join(fork) + "): run it "
                     "with the fork, not with pjreddie's Darknet.")
        if formula == "original":
            notes.append("Its batch norm is pjreddie's (x - mean) / (sqrt(var) + 1e-6), while the fork computes "
                         "(x - mean) / sqrt(var + 1e-5): the fork's outputs differ on channels of small variance.")
        elif formula == "alexeyab":
            notes.append("Batch norm (x - mean) / sqrt(var + 1e-5), the fork's: the fork computes it exactly.")
    elif formula == "alexeyab":
        notes.append("Batch norm (x - mean) / sqrt(var + 1e-5), AlexeyAB's fork's: the fork computes it exactly; "
                     "pjreddie's Darknet reads the file but divides by sqrt(var) + 1e-6, which differs on "
                     "channels of small variance. Converting it back with kprune needs --bn-formula alexeyab.")
    elif formula == "original":
        notes.append("Batch norm (x - mean) / (sqrt(var) + 1e-6), pjreddie's Darknet's: it computes the model "
                     "exactly; AlexeyAB's fork and OpenCV 4's dnn module read the file too, with a batch norm "
                     "that differs on channels of small variance.")
    else:
        notes.append("Both Darknets (and OpenCV 4's dnn module) read it and compute it exactly.")
    return notes


def model_cfg(model) -> str:
    """The Darknet cfg text of ``model`` (see the module docstring for what it keeps).

    Args:
        model: a model built from a Darknet cfg (:func:`kprune.darknet.builder.build_model`), possibly
            pruned, width-scaled or resized since.

    Returns:
        The cfg file's text: comment lines saying which Darknet computes the model exactly, then one
        section per layer, ``[net]`` first.

    Raises:
        ValueError: the model was not built from a Darknet cfg, or has a layer a cfg cannot express
            (the message names the layer).
    """
    sections, formulas = model_sections(model)
    body = format_cfg(sections)
    return format_cfg(sections, _notes(body, formulas, model.name))


def cfg_path_for(weights_path: str | os.PathLike) -> str:
    """The cfg path beside a .weights path: the same stem with ``.cfg`` (``a/b.weights`` -> ``a/b.cfg``)."""
    stem, _ = os.path.splitext(os.fspath(weights_path))
    return stem + ".cfg"


def write_cfg(model, path: str | os.PathLike) -> str:
    """Write the Darknet cfg of ``model`` (:func:`model_cfg`) to ``path`` atomically (a temporary
    file, then a rename: a failure leaves no half-written file).

    Returns:
        The text written.

    Raises:
        ValueError: as :func:`model_cfg`; nothing is written then.
    """
    text = model_cfg(model)
    write_bytes_atomic(path, text.encode("utf-8"))
    return text
