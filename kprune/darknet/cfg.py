"""Darknet cfg files: text -> typed sections. Pure Python, no TensorFlow.

A cfg file is a list of ``[section]`` headers, each followed by ``key=value`` lines. The first section
is ``[net]`` (input size and training options); every later section is one layer, numbered from 0 in
file order, and ``route`` / ``shortcut`` layers refer to earlier layers by those numbers.

Both Darknets are read: pjreddie's original and AlexeyAB's fork (YOLOv4, scaled-YOLOv4, YOLOv7).
Every key of a section is either

- used: typed, validated and given Darknet's default in :data:`_SCHEMAS` (each key's comment says
  where kprune uses it), or
- on :data:`TRAINING_ONLY_KEYS`: keys Darknet reads to train, augment or post-process, which kprune
  reads, keeps as text in :attr:`Section.raw` and deliberately does not use.

Any other key is a :class:`CfgError` naming the key, its section, the layer index and the line:
a cfg kprune does not fully understand is not silently built into a different model. (Darknet
itself ignores unknown keys.)

A cfg that uses a feature only the fork has (:data:`FORK_KEYS`, :data:`FORK_ACTIVATIONS`) was written
for the fork, and its batch norm takes the fork's formula by default (:func:`default_bn_formula`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

REQUIRED = object()  # schema marker: the key has no default


class CfgError(ValueError):
    """A cfg file that kprune cannot build; the message names the section, layer index and line."""


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v != ""]


def _float_list(text: str) -> List[float]:
    return [float(v) for v in text.replace(" ", "").split(",") if v != ""]


# kind -> key -> (converter, default). Defaults are Darknet's own (parser.c of both Darknets).
# Where kprune uses each key: in kprune.darknet.builder unless said otherwise.
_SCHEMAS: Dict[str, Dict[str, tuple]] = {
    "net": {
        "width": (int, REQUIRED),  # the model's input size
        "height": (int, REQUIRED),
        "channels": (int, 3),
    },
    "convolutional": {
        "filters": (int, 1),
        "size": (int, 1),
        "stride": (int, 1),
        "pad": (int, 0),  # pad=1: size // 2 pixels, otherwise `padding`
        "padding": (int, 0),
        "groups": (int, 1),  # only 1 is supported
        "batch_normalize": (int, 0),  # a DarknetBatchNormalization, and the layout of .weights
        "activation": (str, "logistic"),  # one of ACTIVATIONS
    },
    "maxpool": {
        "stride": (int, 1),
        "size": (int, None),  # Darknet: defaults to stride
        "padding": (int, None),  # Darknet: defaults to size - 1 (SPP's size 5/9/13 stride 1: 'same')
    },
    "route": {
        "layers": (_int_list, REQUIRED),  # concatenated in order
        "groups": (int, 1),  # fork: of each listed layer take slice group_id of `groups` (ChannelSlice)
        "group_id": (int, 0),
    },
    "reorg": {"stride": (int, 1), "reverse": (int, 0)},
    "shortcut": {"from": (int, REQUIRED), "activation": (str, "linear")},  # activation after the sum
    "upsample": {"stride": (int, 2)},
    "region": {  # DetectionHead metadata (decoding, targets, loss)
        "anchors": (_float_list, REQUIRED),
        "classes": (int, 20),
        "coords": (int, 4),
        "num": (int, 1),
        "softmax": (int, 0),  # Darknet's default; kprune's region heads need softmax=1
    },
    "yolo": {  # DetectionHead metadata (decoding, targets, loss)
        "anchors": (_float_list, REQUIRED),
        "classes": (int, 20),
        "num": (int, 1),
        "mask": (_int_list, None),
        "scale_x_y": (float, 1.0),  # fork: DetectionHead.scale_x_y
        "new_coords": (int, 0),  # fork: DetectionHead.new_coords
        # fork: the box loss and the loss weights, defaults of kprune's YOLO loss options
        # (DetectionHead.loss_settings; the fork's defaults)
        "iou_loss": (str, "mse"),  # mse or one of kprune.boxes.IOU_KINDS
        "iou_normalizer": (float, 0.75),
        "cls_normalizer": (float, 1.0),
        "obj_normalizer": (float, 1.0),
    },
}

#: kind -> keys Darknet reads to train, augment or post-process its detections; kprune reads them
#: (their text stays in Section.raw) and deliberately does not use them. kprune's own training,
#: augmentation and NMS options live in its configs; kprune always letterboxes at inference
#: (kprune.models.inference.preprocess_image), whatever ``letter_box`` says.
TRAINING_ONLY_KEYS: Dict[str, Tuple[str, ...]] = {
    "net": ("batch", "subdivisions", "momentum", "decay", "angle", "saturation", "exposure", "hue",
            "learning_rate", "burn_in", "max_batches", "policy", "steps", "scales",
            "mosaic", "letter_box", "ema_alpha"),
    "region": ("bias_match", "jitter", "rescore", "object_scale", "noobject_scale", "class_scale",
               "coord_scale", "absolute", "thresh", "random"),
    "yolo": ("jitter", "ignore_thresh", "truth_thresh", "random",
             "iou_thresh", "objectness_smooth", "max_delta", "resize", "nms_kind", "beta_nms"),
}

#: kind -> keys that only AlexeyAB's fork reads (pjreddie's parser.c does not)
FORK_KEYS: Dict[str, Tuple[str, ...]] = {
    "net": ("mosaic", "letter_box", "ema_alpha"),
    "route": ("groups", "group_id"),
    "yolo": ("scale_x_y", "new_coords", "iou_loss", "iou_normalizer", "iou_thresh", "cls_normalizer",
             "obj_normalizer", "objectness_smooth", "max_delta", "resize", "nms_kind", "beta_nms"),
}

SUPPORTED_SECTIONS = tuple(_SCHEMAS)
ACTIVATIONS = ("linear", "leaky", "relu", "logistic", "mish", "swish")
#: activations only the fork has
FORK_ACTIVATIONS = ("mish", "swish")
HEAD_KINDS = ("region", "yolo")
#: the box losses of ``[yolo] iou_loss`` kprune trains with (the fork's ``mse`` and its IoU losses)
YOLO_BOX_LOSSES = ("mse", "iou", "giou", "diou", "ciou")


@dataclass
class Section:
    """One ``[kind]`` section of a cfg file.

    Attributes:
        kind: section name, e.g. ``"convolutional"``.
        index: layer index (0 for the first layer after ``[net]``; -1 for ``[net]``).
        line: 1-based line number of the ``[kind]`` header.
        params: typed values of the schema keys, defaults filled in.
        raw: every ``key=value`` of the section as written (values stripped).
        lines: key -> 1-based line number where it was written.
    """

    kind: str
    index: int
    line: int
    params: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, str] = field(default_factory=dict)
    lines: Dict[str, int] = field(default_factory=dict)
    source: str = "<cfg>"

    @property
    def where(self) -> str:
        layer = "net" if self.index < 0 else f"layer {self.index}"
        return f"{self.source}:{self.line}: [{self.kind}] ({layer})"

    def error(self, message: str, key: Optional[str] = None) -> CfgError:
        """A CfgError naming this section (and the line of ``key`` when given)."""
        where = self.where
        if key is not None and key in self.lines:
            where += f", line {self.lines[key]}"
        return CfgError(f"{where}: {message}")

    def __getitem__(self, key: str) -> Any:
        return self.params[key]


@dataclass
class DarknetCfg:
    """A parsed cfg: the ``[net]`` section and the layer sections in order."""

    net: Section
    layers: List[Section]
    source: str = "<cfg>"

    @property
    def input_shape(self) -> tuple:
        return (self.net["height"], self.net["width"], self.net["channels"])

    def heads(self) -> List[Section]:
        return [s for s in self.layers if s.kind in HEAD_KINDS]


def _convert(section: Section, key: str, converter: Callable, text: str) -> Any:
    try:
        return converter(text)
    except ValueError:
        kind = {int: "an integer", float: "a number", str: "text"}.get(converter, "a list of numbers")
        raise section.error(f"invalid value {key}={text!r}: expected {kind}", key) from None


def _resolve_index(section: Section, key: str, value: int) -> int:
    """Darknet layer references: negative values are relative to this layer, others absolute."""
    target = section.index + value if value < 0 else value
    if not 0 <= target < section.index:
        raise section.error(
            f"{key}={value} refers to layer {target}; only layers 0..{section.index - 1} come before",
            key,
        )
    return target


def _validate(section: Section) -> None:
    p = section.params
    kind = section.kind
    positive = {"convolutional": ("filters", "size", "stride"), "maxpool": ("stride", "size"),
                "reorg": ("stride",), "upsample": ("stride",), "net": ("width", "height", "channels")}
    for key in positive.get(kind, ()):
        if p[key] <= 0:
            raise section.error(f"{key}={p[key]} must be positive", key)
    if kind in ("convolutional", "shortcut") and p["activation"] not in ACTIVATIONS:
        raise section.error(
            f"activation={p['activation']!r} is not supported; expected one of {', '.join(ACTIVATIONS)}",
            "activation",
        )
    if kind == "convolutional":
        if p["groups"] != 1:
            raise section.error(f"groups={p['groups']} is not supported; only groups=1", "groups")
    elif kind == "route":
        p["layers"] = [_resolve_index(section, "layers", v) for v in p["layers"]]
        if not p["layers"]:
            raise section.error("layers= lists no layer", "layers")
        if p["groups"] < 1:
            raise section.error(f"groups={p['groups']} must be positive", "groups")
        if not 0 <= p["group_id"] < p["groups"]:
            raise section.error(f"group_id={p['group_id']} must be in 0..{p['groups'] - 1} (groups={p['groups']})",
                                "group_id")
    elif kind == "shortcut":
        p["from"] = _resolve_index(section, "from", p["from"])
    elif kind == "reorg":
        if p["reverse"]:
            raise section.error("reverse=1 is not supported", "reverse")
    elif kind in HEAD_KINDS:
        anchors = p["anchors"]
        if len(anchors) != 2 * p["num"]:
            raise section.error(
                f"anchors has {len(anchors)} values; num={p['num']} needs {2 * p['num']}", "anchors"
            )
        if p["classes"] <= 0:
            raise section.error(f"classes={p['classes']} must be positive", "classes")
        if kind == "region" and p["coords"] != 4:
            raise section.error(f"coords={p['coords']} is not supported; only 4", "coords")
        if kind == "region" and p["softmax"] != 1:
            raise section.error(f"softmax={p['softmax']} is not supported; only softmax=1", "softmax")
        if kind == "yolo":
            if not p["scale_x_y"] > 0:
                raise section.error(f"scale_x_y={p['scale_x_y']} must be positive", "scale_x_y")
            if p["new_coords"] not in (0, 1):
                raise section.error(f"new_coords={p['new_coords']} is not supported; expected 0 or 1", "new_coords")
            if p["iou_loss"] not in YOLO_BOX_LOSSES:
                raise section.error(f"iou_loss={p['iou_loss']} is not supported; expected one of "
                                    f"{', '.join(YOLO_BOX_LOSSES)}", "iou_loss")
            for key in ("iou_normalizer", "cls_normalizer", "obj_normalizer"):
                if p[key] < 0:
                    raise section.error(f"{key}={p[key]} must be >= 0", key)
            if p["mask"] is None:
                p["mask"] = list(range(p["num"]))
            bad = [m for m in p["mask"] if not 0 <= m < p["num"]]
            if bad:
                raise section.error(f"mask refers to anchors {bad}; num={p['num']}", "mask")


def parse_cfg(text: str, source: str = "<cfg>") -> DarknetCfg:
    """Parse the text of a Darknet cfg file.

    Args:
        text: the file's content.
        source: a name for messages (usually the file path).

    Returns:
        The parsed :class:`DarknetCfg`, with route/shortcut references made absolute.

    Raises:
        CfgError: an unsupported section, an unknown key (neither used nor on
            :data:`TRAINING_ONLY_KEYS`), a missing or invalid key, a key outside any section, a
            reference to a layer that does not come before, or no ``[net]`` first.
    """
    sections: List[Section] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise CfgError(f"{source}:{number}: malformed section header {line!r}")
            kind = line[1:-1].strip()
            if kind == "network":
                kind = "net"
            index = len(sections) - 1
            if kind not in _SCHEMAS:
                where = "net" if index < 0 else f"layer {index}"
                raise CfgError(
                    f"{source}:{number}: [{kind}] ({where}) is not supported; kprune knows "
                    + ", ".join(f"[{k}]" for k in SUPPORTED_SECTIONS)
                )
            sections.append(Section(kind=kind, index=index, line=number, source=source))
            continue
        if not sections:
            raise CfgError(f"{source}:{number}: {line!r} comes before any [section]")
        if "=" not in line:
            raise sections[-1].error(f"line {number}: expected key=value, got {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        sections[-1].raw[key] = value
        sections[-1].lines[key] = number

    if not sections or sections[0].kind != "net":
        raise CfgError(f"{source}: the first section must be [net]")
    for section in sections:
        if section.kind == "net" and section.index != -1:
            raise section.error("[net] may only be the first section")
        schema = _SCHEMAS[section.kind]
        for key in section.raw:
            if key not in schema and key not in TRAINING_ONLY_KEYS.get(section.kind, ()):
                known = sorted(schema) + sorted(TRAINING_ONLY_KEYS.get(section.kind, ()))
                raise section.error(
                    f"unknown key {key!r} in [{section.kind}]; kprune knows {', '.join(known)}", key)
        for key, (converter, default) in schema.items():
            if key in section.raw:
                section.params[key] = _convert(section, key, converter, section.raw[key])
            elif default is REQUIRED:
                raise section.error(f"missing required key {key!r}")
            else:
                section.params[key] = default
        if section.kind == "maxpool":
            if section.params["size"] is None:
                section.params["size"] = section.params["stride"]
            if section.params["padding"] is None:
                section.params["padding"] = section.params["size"] - 1
        _validate(section)
    return DarknetCfg(net=sections[0], layers=sections[1:], source=source)


def fork_features(cfg: DarknetCfg) -> List[str]:
    """The features of ``cfg`` that only AlexeyAB's fork has, one description each (empty for a cfg
    pjreddie's Darknet reads): keys of :data:`FORK_KEYS` and activations of :data:`FORK_ACTIVATIONS`."""
    found = []
    for section in [cfg.net, *cfg.layers]:
        for key in FORK_KEYS.get(section.kind, ()):
            if key in section.raw:
                found.append(f"{section.where}, line {section.lines[key]}: {key}={section.raw[key]}")
        if section.params.get("activation") in FORK_ACTIVATIONS:
            found.append(f"{section.where}, line {section.lines['activation']}: activation={section['activation']}")
    return found


def default_bn_formula(cfg: DarknetCfg) -> str:
    """The batch-norm formula (a key of :data:`kprune.models.bn_formulas.BN_FORMULAS`) the Darknet that
    reads ``cfg`` uses: ``alexeyab`` when the cfg uses any fork-only feature (:func:`fork_features`),
    ``original`` otherwise."""
    return "alexeyab" if fork_features(cfg) else "original"


def read_cfg(path: str | os.PathLike) -> DarknetCfg:
    """Read and parse a cfg file; see :func:`parse_cfg`.

    Raises:
        CfgError: the file is missing or does not parse.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise CfgError(f"cannot read cfg file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CfgError(f"{path} is not a text cfg file (cfg and weights swapped?)") from None
    return parse_cfg(text, source=path)
