"""The interface every detector family implements, and what the families share.

A *family* owns everything that depends on how a detector's outputs are laid out: building its zoo
models, the training targets (TensorFlow ops, run inside tf.data), the loss, decoding raw outputs to
boxes and scores (non-maximum suppression is shared, :mod:`kprune.models.head`), the convs that
predict (head mode, new heads), the metadata a phone-side decoder needs, and the backbone boundary.
Training, evaluation, export, pruning scopes, experiments and the command line only talk to this
interface; :mod:`kprune.detectors` holds the registry that finds a model's family.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from kprune._keras import keras, tf
from kprune.config import build
from kprune.models.layers import detection_heads


class DetectorFamily:
    """One detector family (a kind of output head). Subclasses set :attr:`name`, :attr:`head_types`
    and :attr:`loss_options`, and implement the methods that raise ``NotImplementedError``."""

    #: the registry key (``yolo``, ``ssd``)
    name: str = ""
    #: the head layer classes whose presence among a model's outputs makes it this family's
    head_types: tuple = ()
    #: the dataclass of the options ``loss:`` takes in training configs
    loss_options: type = object
    #: names of the model parts :meth:`scopes` gives, besides ``backbone`` and ``head`` (pruning scopes)
    scope_names: tuple = ()

    # -- the zoo --------------------------------------------------------------------------------
    def zoo(self) -> List[str]:
        """The model names :meth:`build` knows."""
        raise NotImplementedError

    def knows(self, name: str) -> bool:
        """Whether :meth:`build` builds ``name``."""
        return name in self.zoo()

    def build(self, name: str, input_size: Optional[int] = None, classes: Optional[int] = None,
              width: float = 1.0, names: Optional[Sequence[str]] = None):
        """A freshly initialised functional model of zoo model ``name``.

        Raises:
            ValueError: an unknown name, or an input size, class count or width the model cannot take.
        """
        raise NotImplementedError

    def check_input_size(self, model, size: int) -> int:
        """``size`` if the model's architecture runs at that square input size.

        Raises:
            ValueError: a size the architecture refuses (the message says why).
        """
        raise NotImplementedError

    # -- metadata -------------------------------------------------------------------------------
    def owns(self, model) -> bool:
        return any(isinstance(layer, self.head_types) for layer in model.layers)

    def heads(self, model) -> list:
        return detection_heads(model)

    def num_classes(self, model) -> int:
        return self.heads(model)[0].classes

    def class_names(self, model) -> Optional[List[str]]:
        names = self.heads(model)[0].names
        return list(names) if names else None

    def set_class_names(self, model, names: Sequence[str]) -> None:
        for head in self.heads(model):
            if len(names) != head.classes:
                raise ValueError(f"{len(names)} class names for head {head.name} of {head.classes} classes")
            head.names = list(names)

    def backbone_boundary(self, model) -> Optional[List[str]]:
        """Names of the layers that end the backbone (stored in the head), or None if unknown."""
        return self.heads(model)[0].backbone

    def scopes(self, model) -> Dict[str, List[str]]:
        """Names of the layers of each part in :attr:`scope_names` (e.g. a two-stage detector's
        ``rpn``), by part; empty for a family without such parts."""
        return {}

    def boxes_per_image(self, model) -> int:
        """Boxes the model predicts per image, before non-maximum suppression."""
        raise NotImplementedError

    def export_metadata(self, model) -> dict:
        """What a phone-side decoder needs besides the class names and input normalisation."""
        raise NotImplementedError

    def describe(self, model) -> List[str]:
        """Lines for the terminal describing the heads (anchors, classes)."""
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------------
    def target_encoder(self, model, options=None) -> Callable:
        """``encoder(boxes, labels, image_hw, ignore)`` -> dict of targets, TensorFlow ops only.

        ``boxes`` (B, N, 4) normalised xyxy, ``labels`` (B, N) with -1 for padding, ``ignore``
        (B, M, 4) regions that count neither as object nor as background."""
        raise NotImplementedError

    def loss(self, model, options=None) -> Callable:
        """``loss(targets, outputs)`` -> dict of terms averaged over the batch, their sum ``loss``.
        The callable has ``terms``, the names of what it returns (``loss`` last)."""
        raise NotImplementedError

    def distillation(self, model) -> Callable:
        """``distill(student_outputs, teacher_outputs)`` -> ``{"distill": ...}``, a divergence of the
        raw outputs that is zero when they are equal (:mod:`kprune.detectors.distill`)."""
        raise NotImplementedError

    def make_loss_options(self, model, values: Optional[dict] = None):
        """The family's loss options for ``model`` with ``values`` (a config's ``loss:``) applied.

        Raises:
            ValueError: an unknown key (naming it and the known ones) or a bad value.
        """
        defaults = dataclasses.asdict(self.default_loss_options(model))
        return build(self.loss_options, {**defaults, **dict(values or {})}, f"loss (a {self.name} model)")

    def default_loss_options(self, model):
        return self.loss_options()

    def predictor_convs(self, model) -> Dict[str, object]:
        """The convs whose outputs the heads read (or the tfmot wrappers around them), by conv name."""
        raise NotImplementedError

    def replace_classes(self, model, classes: int, names: Optional[Sequence[str]] = None):
        """A copy of ``model`` with new, freshly initialised predictors for ``classes`` classes."""
        raise NotImplementedError

    def trunk_output(self, model):
        """The feature map trunk pre-training classifies object crops from
        (:func:`kprune.train.pretrain.pretrain_trunk`): by default the input of the first head conv."""
        return next(iter(self.predictor_convs(model).values())).input

    # -- inference ------------------------------------------------------------------------------
    def decode(self, model, outputs: Sequence) -> Tuple[tf.Tensor, tf.Tensor]:
        """Raw outputs -> boxes (N, B, 4) xyxy normalised to the input and scores (N, B, classes)."""
        raise NotImplementedError

    def detection_op_inputs(self, model, outputs: Sequence) -> "DetectionOpInputs":
        """Raw outputs -> the inputs of TFLite's ``TFLite_Detection_PostProcess`` op, so that the
        op's decoding followed by its per-class NMS gives what :meth:`decode` followed by
        :func:`~kprune.models.head.non_max_suppression` gives. Traced into the exported graph: TensorFlow
        ops only."""
        raise NotImplementedError(f"the {self.name} family cannot export with the detection post-processing op")

    # -- export ---------------------------------------------------------------------------------
    def int8_float_layers(self, model) -> List[str]:
        """Names of the layers a full-integer (int8) TFLite export keeps in float, inside an
        otherwise integer network (:mod:`kprune.export.selective`): parts whose results int8 would
        spoil (box arithmetic, rankings). None by default: the whole network int8."""
        return []

    def reference_outputs(self, model, images, outputs: Sequence) -> List:
        """The model's raw outputs on ``images`` made comparable, position by position, with an
        export's raw ``outputs`` of the same images (the export check's ``max_abs_diff``). By
        default the model's own outputs: a single-stage detector's outputs depend on the image only."""
        return [o.numpy() for o in tf.nest.flatten(model(images, training=False))]

    def checks_detections(self, model) -> bool:
        """Whether an export of ``model`` is also checked on its detections (decoding and NMS) and
        mAP against Keras, because a small change in its raw outputs can change which boxes it
        considers at all (a ranking inside the graph). False by default: the raw outputs say it."""
        return False


class TableZoo:
    """:meth:`~DetectorFamily.zoo` and :meth:`~DetectorFamily.build` for a family whose zoo is a
    table of builder functions (mixed in before :class:`DetectorFamily`)."""

    #: zoo name -> (builder(input_size, classes, width, names), default input size, default classes)
    models: Dict[str, tuple] = {}
    #: the family's name in messages ("an SSD", "a Faster R-CNN")
    title: str = ""

    def zoo(self) -> List[str]:
        return list(self.models)

    def build(self, name, input_size=None, classes=None, width=1.0, names=None):
        if name not in self.models:
            raise ValueError(f"{name!r} is not {self.title} model; these are: {', '.join(self.models)}")
        builder, size, count = self.models[name]
        if classes is None and names is not None:
            classes = len(names)
        return builder(input_size=input_size or size, classes=count if classes is None else classes, width=width,
                       names=names)


@dataclasses.dataclass(frozen=True)
class DetectionOpInputs:
    """What ``TFLite_Detection_PostProcess`` takes. The op decodes box ``i`` with anchor ``i``
    (y_a, x_a, h_a, w_a) as centre y = ty / y_scale * h_a + y_a, height = exp(th / h_scale) * h_a
    (x, w alike) and reads ``scores`` from column ``background`` on (0 or 1: a background column first).

    Attributes:
        encodings: (1, B, 4) as (ty, tx, th, tw).
        scores: (1, B, background + classes) class scores (not logits: the op only compares them).
        anchors: (B, 4) numpy float32 as (y_a, x_a, h_a, w_a).
        scales: (y_scale, x_scale, h_scale, w_scale).
        background: 1 if ``scores`` starts with a background column, else 0.
    """
    encodings: object
    scores: object
    anchors: object
    scales: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    background: int = 0


def unwrap(layer):
    """The layer inside a tfmot pruning wrapper (or the layer itself)."""
    return layer.layer if isinstance(layer, keras.layers.Wrapper) else layer


def producer(tensor):
    """The layer that made a Keras tensor."""
    return tensor._keras_history.layer


def inbound_layers(layer) -> list:
    """The layers feeding ``layer``'s first call, in input order."""
    return [producer(t) for t in tf.nest.flatten(layer._inbound_nodes[0].keras_inputs)]


def backbone_layers(model, boundary: Sequence[str]) -> List[str]:
    """Names of the layers of ``model`` that the boundary layers depend on, the boundary included.

    Raises:
        ValueError: a boundary layer the model does not have.
    """
    names = {layer.name for layer in model.layers}
    missing = [name for name in boundary if name not in names]
    if missing:
        raise ValueError(f"model {model.name!r}: backbone boundary layer(s) {', '.join(missing)} not found")
    seen, stack = set(), [model.get_layer(name) for name in boundary]
    while stack:
        layer = stack.pop()
        if layer.name in seen:
            continue
        seen.add(layer.name)
        if layer._inbound_nodes and not isinstance(layer, keras.layers.InputLayer):
            stack.extend(inbound_layers(layer))
    return [layer.name for layer in model.layers if layer.name in seen]


def rebuilt(model, changes: Dict[str, dict]):
    """A copy of ``model`` whose named layers get the config changes in ``changes`` (and fresh
    weights); every other layer keeps its weights."""

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), **changes.get(layer.name, {})})

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        if layer.name not in changes and layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return new
