"""Faster R-CNN with FPN (the detectron2 / torchvision recipe) as a detector family.

The package holds the model builders (:mod:`.builders`), the RPN target encoder (:mod:`.targets`),
the two-stage loss (:mod:`.loss`) and the distillation of the raw outputs (:mod:`.distill`); the
family object itself lives here. A model ends in one :class:`~kprune.models.layers.RCNNHead` with
five outputs (RPN logits, RPN deltas, proposals, class logits, class-specific box deltas) that
carries the anchor specification, the proposal count and the box coder weights, so the model file
alone decodes, trains and describes itself.

Scopes: besides ``backbone`` (everything the stage-5 output depends on) and ``head`` (the rest),
``fpn`` (between the backbone and the FPN levels P2..P6), ``rpn`` (the RPN head) and ``roi_head``
(the box head and its predictors) name the parts of the two-stage detector (:meth:`RCNNFamily.scopes`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from kprune._keras import keras, tf
from kprune.detectors.base import DetectorFamily, TableZoo, backbone_layers, inbound_layers, rebuilt, unwrap
from kprune.detectors.rcnn import builders
from kprune.detectors.rcnn.distill import rcnn_distillation
from kprune.detectors.rcnn.loss import RCNNLoss, RCNNLossOptions
from kprune.detectors.rcnn.targets import RPNEncoder
from kprune.models import roi
from kprune.models.layers import RCNNHead

#: zoo name -> (builder, default input size, default classes)
ZOO = {
    "faster-rcnn-r50-fpn": (builders.faster_rcnn_r50_fpn, 640, 80),
    "faster-rcnn-small": (builders.faster_rcnn_small, 256, 5),
}


class RCNNFamily(TableZoo, DetectorFamily):
    models = ZOO
    title = "a Faster R-CNN"
    name = "rcnn"
    head_types = (RCNNHead,)
    loss_options = RCNNLossOptions
    #: the anchors, the proposals' clipping and RoIAlign's level rule are fixed to the input size
    multiscale = False
    #: named parts of the model besides backbone / head (see :meth:`scopes`)
    scope_names = ("fpn", "rpn", "roi_head")

    def head(self, model) -> RCNNHead:
        return self.heads(model)[0]

    def anchors(self, model) -> np.ndarray:
        """The RPN's anchors, (A, 4) xyxy normalised, in the order of the ``rpn_logits`` output."""
        return self.head(model).anchors()

    def proposal_layer(self, model) -> roi.Proposals:
        """The layer that makes the proposals (the head's third input)."""
        return unwrap(inbound_layers(self.head(model))[2])

    def check_input_size(self, model, size):
        if isinstance(size, bool) or int(size) != size or size < 64 or int(size) % builders.SIZE_MULTIPLE:
            raise ValueError(f"input size {size}: a Faster R-CNN FPN takes a multiple of {builders.SIZE_MULTIPLE} "
                             "pixels, at least 64")
        if int(size) != model.input_shape[1]:
            raise ValueError(f"input size {size}: model {model.name!r} has its anchors, proposals and RoIAlign "
                             f"levels fixed to its {model.input_shape[1]} px input; rebuild it at {size} px with "
                             "`kprune init`")
        return int(size)

    def boxes_per_image(self, model) -> int:
        """K, the proposals per image (each with one box per class)."""
        return self.head(model).proposals

    def export_metadata(self, model) -> dict:
        head = self.head(model)
        proposals = self.proposal_layer(model)
        return {"anchor_spec": {"input_size": head.input_size, "strides": head.strides, "sizes": head.sizes,
                                "ratios": head.ratios},
                "anchor_layout": "xyxy normalised to the input; levels in stride order, then rows, columns and "
                                 "ratios (h / w at the area size^2), centres at (j + 0.5) * stride",
                "anchors": len(self.anchors(model)),
                "rpn_box_weights": [1.0, 1.0, 1.0, 1.0],
                "rpn": {"pre_nms_topk": proposals.pre_nms_topk, "nms_iou": proposals.nms_iou,
                        "min_size": proposals.min_size, "per_level_nms": proposals.per_level_nms},
                "proposals": head.proposals,
                "box_weights": head.box_weights,
                "box_outputs": "dx, dy, dw, dh per proposal and class: cx = cx_p + dx / wx * w_p, "
                               "w = w_p * exp(dw / ww) (detectron2's Box2BoxTransform)",
                "class_outputs": "logits of background then each class; scores by softmax",
                "outputs": list(RCNNHead.OUTPUTS)}

    def describe(self, model) -> List[str]:
        head = self.head(model)
        proposals = self.proposal_layer(model)
        return [f"Faster R-CNN FPN head: {head.classes} classes + background, {len(self.anchors(model))} anchors on "
                f"{len(head.strides)} levels (strides {'/'.join(map(str, head.strides))}, "
                f"{len(head.ratios)} ratios), {head.proposals} proposals per image (RPN NMS "
                f"{proposals.nms_iou:g}), class-specific boxes, box weights "
                f"{'/'.join(f'{w:g}' for w in head.box_weights)}"]

    # -- training -------------------------------------------------------------------------------
    def default_loss_options(self, model):
        return RCNNLossOptions(box_weights=tuple(self.head(model).box_weights))

    def make_loss_options(self, model, values: Optional[dict] = None):
        options = super().make_loss_options(model, values)
        weights = [float(w) for w in self.head(model).box_weights]
        if [float(w) for w in options.box_weights] != weights:
            raise ValueError(f"loss box_weights {list(options.box_weights)}: model {model.name!r} decodes its box "
                             f"deltas with {weights}; the loss must encode with the same")
        return options

    def target_encoder(self, model, options: Optional[RCNNLossOptions] = None):
        options = options or self.default_loss_options(model)
        return RPNEncoder.from_options(self.anchors(model), options, key=self.head(model).name)

    def loss(self, model, options: Optional[RCNNLossOptions] = None):
        head = self.head(model)
        return RCNNLoss(options or self.default_loss_options(model), key=head.name, classes=head.classes)

    def distillation(self, model):
        return rcnn_distillation(model)

    # -- inference ------------------------------------------------------------------------------
    def decode(self, model, outputs):
        """Class-specific boxes: each proposal's deltas of each class decoded against the proposal
        (weights :attr:`RCNNHead.box_weights`) and clipped to [0, 1], (N, K, classes, 4); scores the
        softmax of the class logits without the background column, (N, K, classes); padding
        proposals (zero rows) score 0."""
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if len(outputs) != len(RCNNHead.OUTPUTS):
            raise ValueError(f"{len(outputs)} outputs for a Faster R-CNN model, which has "
                             f"{len(RCNNHead.OUTPUTS)}: {', '.join(RCNNHead.OUTPUTS)}")
        head = self.head(model)
        proposals, class_logits, box_deltas = (tf.cast(o, tf.float32) for o in outputs[2:])
        boxes = roi.decode(box_deltas, proposals[:, :, None, :], head.box_weights)
        boxes = tf.clip_by_value(boxes, 0.0, 1.0)
        present = (proposals[..., 2] > proposals[..., 0]) & (proposals[..., 3] > proposals[..., 1])
        scores = tf.nn.softmax(class_logits, axis=-1)[..., 1:] * tf.cast(present, tf.float32)[..., None]
        return boxes, scores

    def detection_op_inputs(self, model, outputs):
        raise NotImplementedError("a Faster R-CNN model cannot export with the TFLite_Detection_PostProcess op: "
                                  "the op decodes one box per anchor against fixed anchors, while a two-stage model "
                                  "decodes class-specific boxes against its own proposals; export it without the "
                                  "post-processing op and decode with kprune (or the exported metadata)")

    # -- export ---------------------------------------------------------------------------------
    def roi_align_layer(self, model):
        """The RoIAlign layer that pools the proposals for the box head (or its tfmot wrapper)."""
        found = [layer for layer in model.layers if isinstance(unwrap(layer), roi.RoIAlign)]
        if len(found) != 1:
            raise ValueError(f"model {model.name!r}: expected one RoIAlign layer, found {len(found)}")
        return found[0]

    def int8_float_layers(self, model) -> List[str]:
        """What stays float in an int8 file: the RPN's predictors and what joins their outputs
        (objectness and delta convs, reshapes, concatenations: :meth:`rpn_output_layers`), the
        Proposals layer (decoding, top-k, NMS) and RoIAlign (level assignment, sampling coordinates
        and weights). The backbone, the FPN, the RPN's shared 3x3 conv and the box head are int8.

        Measured on faster-rcnn-small trained 6 epochs on the synthetic data, mAP@0.5 on its 200
        val images: Keras 0.204, float file 0.201; all int8 0.009; proposals and RoIAlign float but
        their slices, gathers, top-k and the RPN's concatenations int8 (the quantizer keeps such ops
        on their neighbours' scale) 0.076: the concatenated logits were clipped at 0, so the top-k
        drew among ties; with those ops float too (:func:`kprune.export.selective.island_op_types`)
        0.197, in a file of 4.37 MB (float: 15.93 MB). The RPN's two 1x1 predictors are float so
        that its outputs reach the islands without an int8 step (not measured apart); they hold
        15 x (channels + 1) weights."""
        return [*self.rpn_output_layers(model), self.proposal_layer_of(model).name, self.roi_align_layer(model).name]

    def rpn_output_layers(self, model) -> List[str]:
        """The RPN's predictor convs and the layers between them and the head (reshapes,
        concatenations), in model order: its part of :meth:`scopes` without the shared conv that
        feeds the predictors."""
        convs = [layer for layer in self.predictor_convs(model).values()
                 if isinstance(unwrap(layer), keras.layers.Conv2D)]
        feeding = set()
        for conv in convs:
            feeding |= set(backbone_layers(model, [source.name for source in inbound_layers(conv)]))
        return [name for name in self.scopes(model)["rpn"] if name not in feeding]

    def proposal_layer_of(self, model):
        """The layer (or its tfmot wrapper) whose output the head reads as proposals."""
        return inbound_layers(self.head(model))[2]

    def reference_outputs(self, model, images, outputs):
        """The RPN outputs of the model on ``images``, and its ROI outputs computed on the export's
        own proposals (``outputs[2]``): the proposals come from a ranking of the RPN logits and NMS,
        which a small change in the logits reorders (proposal ``k`` of the file is then not the
        model's proposal ``k``), so the ROI rows are compared for the same boxes. The proposals
        output is the export's itself (no difference); how they change the detections is
        :meth:`checks_detections`' part."""
        proposals = self.proposal_layer_of(model).output
        given = keras.Model([model.input, proposals], model.outputs, name=f"{model.name}_on_proposals")
        result = given([tf.constant(images, tf.float32), tf.constant(np.asarray(outputs[2], np.float32))],
                       training=False)
        return [o.numpy() for o in tf.nest.flatten(result)]

    def checks_detections(self, model) -> bool:
        """True: the detections depend on which proposals the RPN ranks first."""
        return True

    # -- heads and scopes -----------------------------------------------------------------------
    def trunk_output(self, model):
        """The backbone's last stage (C5, the boundary the head names): pre-training classifies the
        object crops from the ResNet alone, as ImageNet pre-training does. (From the RPN conv on P2 the
        classifier stayed at chance: 20 % on five classes.)

        Raises:
            ValueError: a model whose head does not name one backbone boundary layer.
        """
        boundary = self.head(model).backbone
        if len(boundary or []) != 1:
            raise ValueError(f"Faster R-CNN model {model.name}: its head names {boundary!r} as the backbone "
                             f"boundary; pre-training needs one layer")
        return model.get_layer(boundary[0]).output

    def predictor_convs(self, model) -> Dict[str, object]:
        """The layers whose outputs the head reads, by name: the RPN's objectness and deltas convs
        and the ROI head's class and box Dense layers (or the tfmot wrappers around them)."""
        head = self.head(model)
        found = {}
        for source in inbound_layers(head):
            layer = source
            # through the RPN's reshape + concatenate and the box deltas' reshape, to the predictor
            while not isinstance(unwrap(layer), (keras.layers.Conv2D, keras.layers.Dense, roi.Proposals)):
                feeding = inbound_layers(layer)
                if not feeding:
                    raise ValueError(f"Faster R-CNN head input {source.name}: no Conv2D or Dense predictor feeds it")
                layer = feeding[0]
            if not isinstance(unwrap(layer), roi.Proposals):
                found[layer.name] = layer
        return found

    def replace_classes(self, model, classes: int, names: Optional[Sequence[str]] = None):
        """New, freshly initialised class and box predictors (Dense layers) for ``classes`` classes;
        the RPN and every other layer keep their weights."""
        head = self.head(model)
        class_layer, box_layer = (name for name, layer in self.predictor_convs(model).items()
                                  if isinstance(unwrap(layer), keras.layers.Dense))
        per_class = inbound_layers(head)[4]
        changes = {head.name: {"classes": classes, "names": list(names) if names is not None else None},
                   class_layer: {"units": classes + 1}, box_layer: {"units": 4 * classes},
                   per_class.name: {"target_shape": (head.proposals, classes, 4)}}
        return rebuilt(model, changes)

    def scopes(self, model) -> Dict[str, List[str]]:
        """Names of the layers of each part: ``fpn`` (what the FPN levels depend on, less the
        backbone), ``rpn`` (what the RPN outputs depend on, less backbone and FPN), ``roi_head`` (what
        the class and box outputs depend on, less the rest: RoIAlign, the box head, the predictors).

        Raises:
            ValueError: a model whose head does not name its backbone boundary and FPN levels.
        """
        head = self.head(model)
        if not head.backbone or not head.features:
            raise ValueError(f"model {model.name!r}: its head does not name the backbone boundary and the FPN "
                             "levels, so its parts are unknown")
        backbone = set(backbone_layers(model, head.backbone))
        fpn = set(backbone_layers(model, head.features)) - backbone
        sources = inbound_layers(head)
        rpn = set(backbone_layers(model, [s.name for s in sources[:2]])) - backbone - fpn
        roi_head = set(backbone_layers(model, [s.name for s in sources[3:]])) - backbone - fpn - rpn
        order = [layer.name for layer in model.layers]
        return {name: [n for n in order if n in part] for name, part in
                (("fpn", fpn), ("rpn", rpn), ("roi_head", roi_head))}
