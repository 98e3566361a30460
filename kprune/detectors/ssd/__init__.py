"""The SSD family: SSD300-VGG16 and SSDLite-MobileNetV2 (:mod:`.builders`), default boxes and box
coder (:mod:`.priors`), MultiBox matching (:mod:`.targets`) and loss (:mod:`.loss`).

A model's output is one tensor (N, P, 4 + classes + 1) made by its
:class:`~kprune.models.layers.MultiBoxHead`, which carries the default-box specification, so the
boxes are recomputed from the model file alone.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from kprune._keras import keras, tf
from kprune.detectors.base import DetectionOpInputs, DetectorFamily, TableZoo, inbound_layers, rebuilt, unwrap
from kprune.detectors.ssd import builders
from kprune.detectors.ssd.distill import ssd_distillation
from kprune.detectors.ssd.loss import MultiBoxLoss, MultiBoxOptions
from kprune.detectors.ssd.priors import decode, priors
from kprune.detectors.ssd.targets import MultiBoxEncoder
from kprune.models.layers import MultiBoxHead

#: zoo name -> (builder, default input size, default classes)
ZOO = {
    "ssd300-vgg16": (builders.ssd300_vgg16, 300, 20),
    "ssdlite-mobilenetv2": (builders.ssdlite_mobilenetv2, 320, 90),
}


class SSDFamily(TableZoo, DetectorFamily):
    models = ZOO
    title = "an SSD"
    name = "ssd"
    head_types = (MultiBoxHead,)
    loss_options = MultiBoxOptions
    #: the default boxes are fixed to the input size, so training batches cannot change size
    multiscale = False

    def head(self, model) -> MultiBoxHead:
        return self.heads(model)[0]

    def anchors(self, model) -> np.ndarray:
        """The model's default boxes, (P, 4) as (y_center, x_center, height, width) normalised."""
        head = self.head(model)
        return priors(head.priors, head.feature_sizes())

    def check_input_size(self, model, size):
        if isinstance(size, bool) or int(size) != size or size < 32:
            raise ValueError(f"input size {size}: must be a whole number of pixels, at least 32")
        fixed = [p["step"] for p in self.head(model).priors if p["step"] is not None]
        if fixed and int(size) != model.input_shape[1]:
            raise ValueError(f"input size {size}: model {model.name!r} places its default boxes with the fixed "
                             f"steps of its {model.input_shape[1]} px input (the original SSD300's); rebuild it "
                             f"at {size} px with `kprune init`")
        return int(size)

    def boxes_per_image(self, model) -> int:
        return int(self.head(model).output_shape[1])

    def export_metadata(self, model) -> dict:
        head = self.head(model)
        return {"anchors": np.round(self.anchors(model), 6).tolist(),
                "anchor_layout": "y_center, x_center, height, width; normalised to the input",
                "variances": head.variances,
                "box_outputs": "ty, tx, th, tw: y = y_a + ty * v0 * h_a, h = h_a * exp(th * v1)",
                "y_scale": 1 / head.variances[0], "x_scale": 1 / head.variances[0],
                "h_scale": 1 / head.variances[1], "w_scale": 1 / head.variances[1],
                "class_outputs": "logits of background then each class; scores by softmax",
                "output": f"one tensor (1, {self.boxes_per_image(model)}, 4 + {head.classes} + 1)"}

    def describe(self, model) -> List[str]:
        head = self.head(model)
        sides = "/".join(str(h) for h, _ in head.feature_sizes())
        return [f"SSD head: {head.classes} classes + background, {self.boxes_per_image(model)} default boxes on "
                f"{len(head.priors)} maps ({sides}), variances {head.variances[0]:g}/{head.variances[1]:g}"]

    def target_encoder(self, model, options: Optional[MultiBoxOptions] = None):
        options = options or MultiBoxOptions()
        head = self.head(model)
        return MultiBoxEncoder(self.anchors(model), head.variances, options.threshold, options.ignore_overlap,
                               key=head.name)

    def loss(self, model, options: Optional[MultiBoxOptions] = None):
        return MultiBoxLoss(options or MultiBoxOptions(), key=self.head(model).name)

    def distillation(self, model):
        return ssd_distillation(model)

    def decode(self, model, outputs):
        if isinstance(outputs, (list, tuple)):
            (outputs,) = outputs
        head = self.head(model)
        output = tf.cast(outputs, tf.float32)
        boxes = decode(output[..., :4], tf.constant(self.anchors(model)), head.variances)
        scores = tf.nn.softmax(output[..., 4:], axis=-1)[..., 1:]
        return boxes, scores

    def detection_op_inputs(self, model, outputs):
        """The op decodes SSD's offsets itself: the default boxes as its anchors, the inverse
        variances as its scales, the softmax scores with their background column."""
        if isinstance(outputs, (list, tuple)):
            (outputs,) = outputs
        head = self.head(model)
        output = tf.cast(outputs, tf.float32)
        variances = head.variances
        return DetectionOpInputs(output[..., :4], tf.nn.softmax(output[..., 4:], axis=-1),
                                 np.asarray(self.anchors(model), np.float32),
                                 (1 / variances[0], 1 / variances[0], 1 / variances[1], 1 / variances[1]),
                                 background=1)

    def predictor_convs(self, model) -> Dict[str, object]:
        convs = {}
        for source in inbound_layers(self.head(model)):
            if not isinstance(unwrap(source), keras.layers.Conv2D):
                raise ValueError(f"SSD head input {source.name} is not a Conv2D (found {type(unwrap(source)).__name__})")
            convs[source.name] = source
        return convs

    def replace_classes(self, model, classes: int, names: Optional[Sequence[str]] = None):
        """New, freshly initialised class predictors for ``classes`` classes; the box predictors and
        every other layer keep their weights."""
        head = self.head(model)
        changes = {head.name: {"classes": classes, "names": list(names) if names is not None else None}}
        for layer, count in zip(inbound_layers(head)[1::2], head.boxes_per_location()):
            changes[layer.name] = {"filters": count * (classes + 1)}
        return rebuilt(model, changes)
