"""The YOLO family: Darknet's region (YOLOv2) and yolo (YOLOv3) heads, built from Darknet cfgs.

Its zoo is the cfgs shipped in ``kprune/models/cfg``; any cfg file path builds too. Each head conv
feeds a :class:`~kprune.models.layers.DetectionHead` carrying kind, anchors, mask, classes, names and
the backbone boundary (the end of the Darknet trunk the cfg starts with).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from kprune._keras import keras
from kprune.darknet import zoo
from kprune.darknet.builder import build_model
from kprune.detectors.base import DetectorFamily, inbound_layers, rebuilt, unwrap
from kprune.detectors.yolo.anchors import fit_anchors
from kprune.detectors.yolo.decode import decode_outputs, detection_op_inputs
from kprune.detectors.yolo.distill import yolo_distillation
from kprune.detectors.yolo.loss import LossOptions, YoloLoss
from kprune.detectors.yolo.targets import TargetEncoder
from kprune.models.layers import DetectionHead


def _head_conv(head):
    """The conv (or the tfmot wrapper around it) whose output a head reads, directly or through an
    activation (YOLOv7 and scaled-YOLOv4 heads: the conv's ``activation=logistic``).

    Raises:
        ValueError: something else feeds the head.
    """
    (source,) = inbound_layers(head)
    while isinstance(unwrap(source), keras.layers.Activation):
        (source,) = inbound_layers(source)
    if not isinstance(unwrap(source), keras.layers.Conv2D):
        raise ValueError(f"head {head.name} is not fed by a Conv2D, directly or through an activation "
                         f"(found {type(unwrap(source)).__name__})")
    return source


class YoloFamily(DetectorFamily):
    name = "yolo"
    head_types = (DetectionHead,)
    loss_options = LossOptions

    def zoo(self) -> List[str]:
        return zoo.available()

    def knows(self, name: str) -> bool:
        """A zoo name or a cfg file."""
        import os

        return name in self.zoo() or (str(name).endswith(".cfg") and os.path.isfile(name))

    def build(self, name, input_size=None, classes=None, width=1.0, names=None):
        if classes is not None and (int(classes) != classes or classes < 1):
            raise ValueError(f"classes {classes}: a detector needs at least one class")
        model = build_model(zoo.cfg_path(name), width=width, **({"input_size": input_size} if input_size else {}),
                            **({"classes": int(classes)} if classes else {}))
        if names is not None:
            self.set_class_names(model, names)
        return model

    def check_input_size(self, model, size):
        if int(size) != size or size < 32 or size % 32:
            raise ValueError(f"input size {size}: a YOLO model takes a multiple of 32, at least 32")
        return int(size)

    def boxes_per_image(self, model) -> int:
        return int(sum(h.output_shape[1] * h.output_shape[2] * h.num_anchors for h in self.heads(model)))

    def export_metadata(self, model) -> dict:
        size = model.input_shape[1:3]
        return {"heads": [{"kind": h.kind, "anchors": h.head_anchors, "mask": h.mask,
                           "anchor_units": "grid cells" if h.kind == "region" else "input pixels",
                           "stride": int(size[0] // h.output_shape[1]), "grid": list(h.output_shape[1:3]),
                           "classes": h.classes, "scale_x_y": h.scale_x_y, "new_coords": h.new_coords,
                           "outputs": "per anchor: " + ("x, y, w, h, objectness, class probabilities (after the "
                                                        "logistic)" if h.new_coords else
                                                        "tx, ty, tw, th, objectness, class logits")}
                          for h in self.heads(model)]}

    def describe(self, model) -> List[str]:
        lines = []
        for head in self.heads(model):
            unit = "grid cells" if head.kind == "region" else "input pixels"
            anchors = ", ".join(f"{w:g}x{h:g}" for w, h in head.head_anchors)
            lines.append(f"{head.kind} head: {head.classes} classes, anchors (w x h, {unit}) {anchors}")
        return lines

    def default_loss_options(self, model):
        """YAD2K's settings for region heads; Darknet's for yolo heads (YOLOv3's, with the cfg's box
        loss and normalizers where the AlexeyAB fork's cfg sets them)."""
        head = self.heads(model)[0]
        if head.kind != "yolo":
            return LossOptions()
        cfg = head.loss_settings or {}
        objects = float(cfg.get("obj_normalizer", 1.0))
        return LossOptions(object_scale=objects, no_object_scale=objects, threshold=0.5,
                           class_scale=float(cfg.get("cls_normalizer", 1.0)), box_loss=cfg.get("iou_loss", "mse"),
                           iou_normalizer=float(cfg.get("iou_normalizer", 0.75)))

    def target_encoder(self, model, options=None):
        return TargetEncoder.from_model(model)

    def loss(self, model, options=None):
        return YoloLoss.from_model(model, options or self.default_loss_options(model))

    def distillation(self, model):
        return yolo_distillation(model)

    def decode(self, model, outputs):
        return decode_outputs(model, outputs)

    def detection_op_inputs(self, model, outputs):
        return detection_op_inputs(model, outputs)

    def predictor_convs(self, model) -> Dict[str, object]:
        """The conv feeding each head (or the tfmot wrapper around it), by conv name.

        Raises:
            ValueError: a head is not fed by a Conv2D (directly or through an activation).
        """
        convs = {}
        for head in self.heads(model):
            source = _head_conv(head)
            convs[source.name] = source
        return convs

    def replace_classes(self, model, classes: int, names: Optional[Sequence[str]] = None):
        """New, freshly initialised head convs and heads for ``classes`` classes; every other layer
        keeps its weights."""
        changes = {head.name: {"classes": classes, "names": list(names) if names is not None else None}
                   for head in self.heads(model)}
        for head in self.heads(model):
            changes[_head_conv(head).name] = {"filters": head.num_anchors * (5 + classes)}
        return rebuilt(model, changes)

    def fit_anchors(self, model, data, split="train", letterbox=True, seed=0) -> dict:
        return fit_anchors(model, data, split, letterbox=letterbox, seed=seed)

    def set_anchors(self, model, anchors) -> dict:
        """Give every head the (w, h) ``anchors`` in its own units.

        Raises:
            ValueError: a count that differs from the heads'.
        """
        heads = self.heads(model)
        for head in heads:
            if len(anchors) != len(head.anchors):
                raise ValueError(f"anchors: {len(anchors)} pairs given, but head {head.name} has "
                                 f"{len(head.anchors)} anchors (its last conv's channels depend on the count)")
            head.anchors = [list(pair) for pair in anchors]
        return {"anchors": [anchors] * len(heads), "mean_iou": None, "mean_iou_before": None}
