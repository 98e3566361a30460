"""The Faster R-CNN zoo: ResNet-50 + FPN as detectron2 and torchvision build it, and a small
ResNet-18-style variant that trains on a CPU.

Both are functional tf_keras models on a square image in [0, 1] (a ``preprocess`` layer does the
backbone's normalisation) with a fixed number K of proposals, made of built-in and registered
layers only (they load with ``safe_mode``), and end in one :class:`~kprune.models.layers.RCNNHead`
with five outputs: RPN logits (N, A), RPN deltas (N, A, 4), proposals (N, K, 4), class logits (N, K, classes + 1) and
class-specific box deltas (N, K, classes, 4).

The shared parts, with detectron2's layer names where it has them:

- FPN (Lin et al. 2017): ``fpn_lateral{l}`` 1x1 convs on C2..C5, the top-down path
  (``fpn_top_down{l}`` nearest 2x upsampling, ``fpn_sum{l}`` addition), ``fpn_output{l}`` 3x3
  convs giving P2..P5, and ``fpn_p6``, a 1x1 max-pool of stride 2 on P5 (detectron2's
  ``LastLevelMaxPool``).
- RPN: ONE head shared by all levels, as in detectron2 and torchvision (the same weights slide over
  every level): ``rpn_conv`` (3x3 + ReLU), ``rpn_objectness_logits`` (1x1, one logit per anchor of a
  location) and ``rpn_anchor_deltas`` (1x1, 4 per anchor), each a single layer called on P2..P6.
  Each level's outputs are reshaped (``rpn_logits_p{l}``, ``rpn_deltas_p{l}``) to anchors in
  :func:`~kprune.models.roi.fpn_anchors` order and joined (``rpn_logits``, ``rpn_deltas``).
- ``proposals`` (:class:`~kprune.models.roi.Proposals`), ``roi_align`` (7x7 RoIAlign on P2..P5),
  ``roi_flatten`` (a per-proposal Reshape to (N, K, 49 C)), the box head ``roi_fc1``, ``roi_fc2``
  (Dense + ReLU), and the predictors ``roi_class_logits`` (classes + 1, background first) and
  ``roi_box_deltas`` (4 per class) reshaped to (N, K, classes, 4) by ``roi_box_deltas_per_class``.

Input sizes must be multiples of 32: the top-down path adds a 2x upsampled level to the one below,
so every C_l must have exactly twice the side of C_(l+1). P6 needs nothing more: its side is
ceil(side / 64) at any multiple of 32, which is what the anchors assume.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from kprune._keras import keras
from kprune.models.layers import RCNNHead
from kprune.models.roi import FPN_RATIOS, FPN_SIZES, FPN_STRIDES, ROI_BOX_WEIGHTS, Proposals, RoIAlign
from kprune.models.width import round_filters

L = keras.layers
#: levels pooled by RoIAlign (P2..P5) and given to the RPN (P2..P6)
ROI_LEVELS = (2, 3, 4, 5)
RPN_LEVELS = (2, 3, 4, 5, 6)
#: the side multiple the FPN's top-down additions need
SIZE_MULTIPLE = 32


def check_size(name: str, size, minimum: int = 64) -> int:
    """``size`` if it is a whole multiple of 32 pixels, at least ``minimum``.

    Raises:
        ValueError: naming the size and why.
    """
    if isinstance(size, bool) or int(size) != size or size < minimum or int(size) % SIZE_MULTIPLE:
        raise ValueError(f"input size {size}: {name} takes a multiple of {SIZE_MULTIPLE} pixels, at least "
                         f"{minimum} (the FPN adds each level to twice the next one, so every stride up to 32 "
                         "must divide the input)")
    return int(size)


def _check_common(classes, width, proposals, pre_nms_topk) -> None:
    if isinstance(classes, bool) or int(classes) != classes or classes < 1:
        raise ValueError(f"classes {classes}: a detector needs at least one class")
    if not width > 0:
        raise ValueError(f"width multiplier {width}: must be positive")
    for key, value in (("proposals", proposals), ("pre_nms_topk", pre_nms_topk)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{key} {value}: must be a whole number of at least 1")


def fpn(features: Sequence, channels: int) -> Dict[int, object]:
    """The FPN on C2..C5 (``features``, in that order): P2..P6 by level number."""
    laterals = {level: L.Conv2D(channels, 1, name=f"fpn_lateral{level}")(c)
                for level, c in zip(ROI_LEVELS, features)}
    merged = {5: laterals[5]}
    for level in (4, 3, 2):
        top_down = L.UpSampling2D(2, interpolation="nearest", name=f"fpn_top_down{level}")(merged[level + 1])
        merged[level] = L.Add(name=f"fpn_sum{level}")([laterals[level], top_down])
    levels = {level: L.Conv2D(channels, 3, padding="same", name=f"fpn_output{level}")(merged[level])
              for level in ROI_LEVELS}
    levels[6] = L.MaxPooling2D(1, strides=2, name="fpn_p6")(levels[5])
    return levels


def rpn(levels: Dict[int, object], channels: int, anchors_per_location: int) -> Tuple[object, object]:
    """The RPN head, one set of layers called on every level: (logits (N, A), deltas (N, A, 4))."""
    conv = L.Conv2D(channels, 3, padding="same", activation="relu", name="rpn_conv")
    objectness = L.Conv2D(anchors_per_location, 1, name="rpn_objectness_logits")
    deltas = L.Conv2D(4 * anchors_per_location, 1, name="rpn_anchor_deltas")
    logits, boxes = [], []
    for level in RPN_LEVELS:
        x = conv(levels[level])
        height, width = int(x.shape[1]), int(x.shape[2])
        count = height * width * anchors_per_location
        # (N, H, W, a) -> (N, H W a): row-major cells, then the ratios (fpn_anchors' order);
        # (N, H, W, 4a) -> (N, H W a, 4): channel 4 r + k is delta k of ratio r (detectron2's layout)
        logits.append(L.Reshape((count,), name=f"rpn_logits_p{level}")(objectness(x)))
        boxes.append(L.Reshape((count, 4), name=f"rpn_deltas_p{level}")(deltas(x)))
    return (L.Concatenate(axis=1, name="rpn_logits")(logits),
            L.Concatenate(axis=1, name="rpn_deltas")(boxes))


def two_stage(inputs, features: Sequence, backbone: List[str], input_size: int, classes: int, names,
              fpn_channels: int, head_units: int, proposals: int, pre_nms_topk: int, name: str,
              min_size: float = 0.0, anchor_sizes: Sequence[float] = FPN_SIZES, canonical_size: float = 224.0):
    """FPN, RPN, proposals, RoIAlign, box head, predictors and the :class:`RCNNHead` on the backbone
    stages ``features`` (C2..C5), with one anchor side of ``anchor_sizes`` (pixels) per level P2..P6
    and RoIAlign's level rule putting boxes of side ``canonical_size`` on P4; returns the model."""
    levels = fpn(features, fpn_channels)
    logits, deltas = rpn(levels, fpn_channels, len(FPN_RATIOS))
    boxes = Proposals(input_size, FPN_STRIDES, anchor_sizes, FPN_RATIOS, pre_nms_topk=pre_nms_topk, count=proposals,
                      nms_iou=0.7, min_size=min_size, name="proposals")([logits, deltas])
    pooled = RoIAlign(output_size=7, sampling_ratio=2, aligned=True, input_size=input_size,
                      canonical_size=canonical_size,
                      name="roi_align")([levels[level] for level in ROI_LEVELS] + [boxes])
    x = L.Reshape((proposals, 7 * 7 * fpn_channels), name="roi_flatten")(pooled)
    x = L.Dense(head_units, activation="relu", name="roi_fc1")(x)
    x = L.Dense(head_units, activation="relu", name="roi_fc2")(x)
    class_logits = L.Dense(classes + 1, name="roi_class_logits")(x)
    box_deltas = L.Dense(4 * classes, name="roi_box_deltas")(x)
    box_deltas = L.Reshape((proposals, classes, 4), name="roi_box_deltas_per_class")(box_deltas)
    head = RCNNHead(classes, input_size, FPN_STRIDES, anchor_sizes, FPN_RATIOS, proposals=proposals,
                    box_weights=ROI_BOX_WEIGHTS, names=names, backbone=backbone,
                    features=[levels[level]._keras_history.layer.name for level in RPN_LEVELS], name="rcnn")
    outputs = head([logits, deltas, boxes, class_logits, box_deltas])
    return keras.Model(inputs, outputs, name=name)


def faster_rcnn_r50_fpn(input_size: int = 640, classes: int = 80, width: float = 1.0,
                        names: Optional[Sequence[str]] = None, weights: Optional[str] = None,
                        proposals: int = 1000, pre_nms_topk: int = 1000, name: str = "faster-rcnn-r50-fpn"):
    """Faster R-CNN R50-FPN (detectron2's ``faster_rcnn_R_50_FPN``, torchvision's
    ``fasterrcnn_resnet50_fpn``): ResNet-50 from tf_keras.applications (C2..C5 =
    ``conv2_block3_out`` .. ``conv5_block3_out``), FPN of 256 channels, the shared RPN head with 3
    anchors per location, 7x7 RoIAlign, a box head of 2 x 1024 and the predictors. K = 1000
    proposals after NMS from the 1000 best anchors of each level (detectron2's test settings).

    With 80 classes: 41,832,736 parameters (41,779,616 trainable), against torchvision's 41,755,286
    with 91 classes. The difference is exact: tf_keras' ResNet-50 has a bias in every conv and
    batch norms with gamma, beta, moving mean and variance (+5 per backbone channel, 26,560 channels:
    +132,800), where torchvision's convs have no bias and its batch norms are frozen buffers; and
    81 class logits instead of 91 (-10 x 1025) and 80 x 4 box outputs instead of 91 x 4 (torchvision
    predicts a box for the background too: -44 x 1025).

    The input (RGB in [0, 1]) is scaled to 0..255 and the ImageNet channel means subtracted (the
    "caffe" normalisation tf_keras' ResNet-50 weights were trained with).

    Args:
        width: only 1 (tf_keras' ResNet-50 has no width multiplier; ``faster-rcnn-small`` has one).
        weights: ResNet-50's: None (random), ``imagenet`` (downloaded by Keras) or the path of a
            weights file for ``include_top=False``. Those weights take BGR images; the first conv's
            input channels are reversed so that the model takes RGB.
        proposals: K, proposals per image.
        pre_nms_topk: anchors per level considered before the RPN's NMS.

    Raises:
        ValueError: a size that is not a multiple of 32 of at least 64, classes < 1, width other
            than 1, proposals or pre_nms_topk < 1.
    """
    _check_common(classes, width, proposals, pre_nms_topk)
    if width != 1.0:
        raise ValueError(f"width multiplier {width}: {name} takes width 1 only (tf_keras' ResNet-50 has no width "
                         "multiplier); faster-rcnn-small takes any width")
    size = check_size(name, input_size)
    inputs = keras.Input((size, size, 3), name="image")
    x = L.Rescaling(255.0, offset=[-123.68, -116.779, -103.939], name="preprocess")(inputs)
    resnet = keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=x)
    if weights is not None:
        conv1 = resnet.get_layer("conv1_conv")
        kernel, bias = conv1.get_weights()
        conv1.set_weights([kernel[:, :, ::-1, :], bias])
    stages = ["conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"]
    features = [resnet.get_layer(stage).output for stage in stages]
    return two_stage(inputs, features, ["conv5_block3_out"], size, int(classes), names, fpn_channels=256,
                     head_units=1024, proposals=int(proposals), pre_nms_topk=int(pre_nms_topk), name=name)


#: the small variant's stage filters at width 1 (half of ResNet-18's 64, 128, 256, 512) and stem
SMALL_STAGES = (32, 64, 128, 256)
SMALL_STEM = 32
#: the small variant's anchor sides on P2..P6 (pixels): detectron2's 32 .. 512 scaled by 3 / 4, for
#: objects of a 256 px input. On the synthetic data (object sides about 15 to 135 px at 256 px) the
#: best anchor of a true box overlaps it with IoU >= 0.5 for 95 % of the boxes, against 85 % with
#: 32 .. 512 (whose 256 and 512 px anchors on P5 / P6 are larger than most objects or the image).
SMALL_ANCHOR_SIZES = (24, 48, 96, 192, 384)
#: the box side RoIAlign pools from P4 in the small variant (the level rule's canonical size): the
#: P4 anchor side, so that a box is pooled from the level whose anchors fit it. detectron2's 224 is
#: for images of 800 px and more; at 256 px it would pool every box under 112 px from P2.
SMALL_CANONICAL_SIZE = 96.0


def _basic_block(x, filters: int, stride: int, name: str):
    """ResNet's basic block: 3x3 conv, BN, ReLU, 3x3 conv, BN, plus the shortcut (a 1x1 conv and BN
    where the shape changes), ReLU."""
    shortcut = x
    if stride != 1 or int(x.shape[-1]) != filters:
        shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv")(x)
        shortcut = L.BatchNormalization(epsilon=1e-5, name=f"{name}_0_bn")(shortcut)
    y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_1_conv")(x)
    y = L.BatchNormalization(epsilon=1e-5, name=f"{name}_1_bn")(y)
    y = L.ReLU(name=f"{name}_1_relu")(y)
    y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    y = L.BatchNormalization(epsilon=1e-5, name=f"{name}_2_bn")(y)
    y = L.Add(name=f"{name}_add")([shortcut, y])
    return L.ReLU(name=f"{name}_out")(y)


def faster_rcnn_small(input_size: int = 256, classes: int = 5, width: float = 1.0,
                      names: Optional[Sequence[str]] = None, proposals: int = 128, pre_nms_topk: int = 256,
                      anchor_sizes: Sequence[float] = SMALL_ANCHOR_SIZES, canonical_size: float = SMALL_CANONICAL_SIZE,
                      name: str = "faster-rcnn-small"):
    """A Faster R-CNN FPN small enough to train on a CPU: a ResNet-18 layout (a 7x7 stride-2 stem
    conv and a 3x3 stride-2 max-pool, then two basic blocks per stage, batch norm after every conv)
    at half ResNet-18's width (stem 32, stages 32, 64, 128, 256 filters: C2..C5 =
    ``conv{2..5}_block2_out``), FPN and RPN of 64 channels, a box head of 2 x 256, K = 128
    proposals from the 256 best anchors of each level, a 256 px input. Anchor sides 24, 48, 96, 192,
    384 px on P2..P6 (:data:`SMALL_ANCHOR_SIZES`, ``anchor_sizes``: three quarters of the full
    model's, for a smaller input); ratios, RoIAlign and box coding are those of the full model. The
    input (RGB in [0, 1]) is mapped to [-1, 1].

    ``width`` multiplies every filter and unit count but the predictors' (rounded to a multiple
    of 8). At width 1 with 5 classes: 3,924,998 parameters.

    Raises:
        ValueError: a size that is not a multiple of 32 of at least 64, classes < 1, width <= 0,
            proposals or pre_nms_topk < 1, not one positive anchor size per level P2..P6.
    """
    _check_common(classes, width, proposals, pre_nms_topk)
    size = check_size(name, input_size)
    if len(anchor_sizes) != len(RPN_LEVELS) or any(not s > 0 for s in anchor_sizes):
        raise ValueError(f"anchor_sizes {tuple(anchor_sizes)}: one positive size (pixels) per level P2..P6, "
                         f"{len(RPN_LEVELS)} in all")

    def filters(n):
        return round_filters(n, width) if width != 1.0 else n

    inputs = keras.Input((size, size, 3), name="image")
    x = L.Rescaling(2.0, offset=-1.0, name="preprocess")(inputs)  # to [-1, 1]
    x = L.Conv2D(filters(SMALL_STEM), 7, strides=2, padding="same", use_bias=False, name="conv1_conv")(x)
    x = L.BatchNormalization(epsilon=1e-5, name="conv1_bn")(x)
    x = L.ReLU(name="conv1_relu")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")(x)
    features = []
    for stage, depth in enumerate(SMALL_STAGES, start=2):
        for block in (1, 2):
            stride = 2 if block == 1 and stage > 2 else 1
            x = _basic_block(x, filters(depth), stride, f"conv{stage}_block{block}")
        features.append(x)
    return two_stage(inputs, features, ["conv5_block2_out"], size, int(classes), names,
                     fpn_channels=filters(64), head_units=filters(256), proposals=int(proposals),
                     pre_nms_topk=int(pre_nms_topk), name=name, anchor_sizes=tuple(anchor_sizes),
                     canonical_size=float(canonical_size))
