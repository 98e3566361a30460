"""The SSD zoo: the original SSD300 on VGG16 (Liu et al. 2016, the Caffe model) and SSDLite on
MobileNetV2 (Sandler et al. 2018, as TensorFlow's object detection API builds it).

Both take an image in [0, 1] (a ``preprocess`` layer does each backbone's own normalisation), any
square input size their feature maps survive, any class count and a width multiplier (every conv's
filters but the predictors', rounded to a multiple of 8). Layer names follow the papers: ``conv4_3``,
``fc7``, ``conv8_2`` ... and ``conv4_3_norm_mbox_loc`` / ``_mbox_conf`` for SSD300; MobileNetV2's
own names, ``extra_K_*`` and ``box_K`` / ``class_K`` for SSDLite.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from kprune._keras import keras
from kprune.models.layers import L2Normalization, MultiBoxHead
from kprune.models.width import round_filters

L = keras.layers
VARIANCES = (0.1, 0.2)

# SSD300 (Caffe): min / max sizes and steps in pixels of the 300 px input
_SSD300_MIN = (30, 60, 111, 162, 213, 264)
_SSD300_MAX = (60, 111, 162, 213, 264, 315)
_SSD300_STEPS = (8, 16, 32, 64, 100, 300)
_SSD300_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))


def _ceil_half(size: int) -> int:
    return -(-size // 2)


def vgg16_feature_sizes(size: int) -> List[int]:
    """Sides of SSD300's six feature maps at a square input of ``size`` (38, 19, 10, 5, 3, 1 at 300)."""
    conv4_3 = _ceil_half(_ceil_half(_ceil_half(size)))  # pool1-3 in Caffe's ceil mode
    fc7 = _ceil_half(conv4_3)
    conv8_2 = (fc7 - 1) // 2 + 1  # 3x3, stride 2, pad 1
    conv9_2 = (conv8_2 - 1) // 2 + 1
    return [conv4_3, fc7, conv8_2, conv9_2, conv9_2 - 2, conv9_2 - 4]  # conv10_2, conv11_2: valid 3x3


def mobilenet_feature_sizes(size: int) -> List[int]:
    """Sides of SSDLite's six feature maps (stride 16, 32, then four stride-2 extras; 'same' padding)."""
    sides = [_ceil_half(_ceil_half(_ceil_half(_ceil_half(size))))]
    for _ in range(5):
        sides.append(_ceil_half(sides[-1]))
    return sides


def check_size(name: str, size, sides_of, minimum: int) -> int:
    """``size`` if it is a whole number >= ``minimum`` whose feature maps are all at least 1 x 1.

    Raises:
        ValueError: naming the size and the map that vanishes.
    """
    if isinstance(size, bool) or int(size) != size or size < minimum:
        raise ValueError(f"input size {size}: {name} takes a whole number of pixels, at least {minimum}")
    sides = sides_of(int(size))
    if min(sides) < 1:
        raise ValueError(f"input size {size}: {name}'s feature maps would be {sides} pixels; the last ones vanish "
                         f"(take a larger size, e.g. 300)")
    return int(size)


def _check_common(classes, width) -> None:
    if isinstance(classes, bool) or int(classes) != classes or classes < 1:
        raise ValueError(f"classes {classes}: a detector needs at least one class")
    if not width > 0:
        raise ValueError(f"width multiplier {width}: must be positive")


def _multibox(sources: Sequence[Tuple[str, object]], priors: Sequence[dict], classes: int, names, backbone,
              predictor) -> object:
    """Box and class predictors on every source, joined by the :class:`MultiBoxHead`."""
    head = MultiBoxHead(classes, priors, VARIANCES, names=names, backbone=backbone, name="multibox")
    inputs = []
    for (source, tensor), count in zip(sources, head.boxes_per_location()):
        inputs.append(predictor(tensor, count * 4, source, "box"))
        inputs.append(predictor(tensor, count * (classes + 1), source, "class"))
    return head(inputs)


def ssd300_vgg16(input_size: int = 300, classes: int = 20, width: float = 1.0,
                 names: Optional[Sequence[str]] = None, name: str = "ssd300-vgg16"):
    """The original SSD300: VGG16 to conv5_3 (pools 2x2 in Caffe's ceil mode, pool5 3x3 stride 1),
    fc6 as a 3x3 conv with dilation 6 and fc7 as a 1x1 conv, conv4_3 L2-normalised with a learned
    scale (20 at first), extras conv8_1 .. conv11_2, 3x3 predictors on six maps with 4, 6, 6, 6, 4, 4
    default boxes per location: 8732 at 300 px. With 20 classes: 26,285,486 parameters.

    The input (RGB in [0, 1]) is scaled to 0..255 and VGG's channel means subtracted.

    Raises:
        ValueError: a size whose feature maps vanish (below 258 px), classes < 1, width <= 0.
    """
    _check_common(classes, width)
    size = check_size("SSD300-VGG16", input_size, vgg16_feature_sizes, 1)
    classes = int(classes)

    def filters(n):
        return round_filters(n, width) if width != 1.0 else n

    def conv(x, n, kernel, name, strides=1, padding="same", dilation=1):
        return L.Conv2D(filters(n), kernel, strides=strides, padding=padding, dilation_rate=dilation,
                        activation="relu", name=name)(x)

    inputs = keras.Input((size, size, 3), name="image")
    x = L.Rescaling(255.0, offset=[-123.68, -116.779, -103.939], name="preprocess")(inputs)
    sources = []
    for block, (depth, count) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), start=1):
        for i in range(1, count + 1):
            x = conv(x, depth, 3, f"conv{block}_{i}")
        if block == 4:
            sources.append(("conv4_3_norm", L2Normalization(20.0, name="conv4_3_norm")(x)))
        if block < 5:
            x = L.MaxPooling2D(2, 2, padding="same", name=f"pool{block}")(x)
    x = L.MaxPooling2D(3, 1, padding="same", name="pool5")(x)
    x = conv(x, 1024, 3, "fc6", dilation=6)
    x = conv(x, 1024, 1, "fc7")
    sources.append(("fc7", x))
    for number, (squeeze, depth, stride) in zip((8, 9, 10, 11), ((256, 512, 2), (128, 256, 2), (128, 256, 1),
                                                                (128, 256, 1))):
        x = conv(x, squeeze, 1, f"conv{number}_1")
        if stride == 2:  # Caffe pads 1 on every side; Keras' "same" would pad right/bottom only
            x = L.ZeroPadding2D(1, name=f"conv{number}_2_pad")(x)
        x = conv(x, depth, 3, f"conv{number}_2", strides=stride, padding="valid")
        sources.append((f"conv{number}_2", x))
    caffe = size == 300
    priors = [{"min_size": lo / 300, "max_size": hi / 300, "aspect_ratios": list(ratios),
               "step": step / 300 if caffe else None, "offset": 0.5}
              for lo, hi, step, ratios in zip(_SSD300_MIN, _SSD300_MAX, _SSD300_STEPS, _SSD300_RATIOS)]

    def predictor(tensor, channels, source, kind):
        suffix = "mbox_loc" if kind == "box" else "mbox_conf"
        return L.Conv2D(channels, 3, padding="same", name=f"{source}_{suffix}")(tensor)

    output = _multibox(sources, priors, classes, names, ["fc7"], predictor)
    return keras.Model(inputs, output, name=name)


def ssdlite_mobilenetv2(input_size: int = 320, classes: int = 90, width: float = 1.0,
                        names: Optional[Sequence[str]] = None, weights: Optional[str] = None,
                        name: str = "ssdlite-mobilenetv2"):
    """SSDLite on MobileNetV2 (tf_keras.applications, ``alpha=width``): feature maps at
    ``block_13_expand_relu`` (stride 16) and ``out_relu`` (stride 32), four extra blocks (1x1 conv,
    3x3 depthwise stride 2, 1x1 conv; 512, 256, 256, 128 filters), and on each of the six maps
    depthwise-separable predictors (3x3 depthwise + batch norm + ReLU6, then a 1x1 conv). Default
    boxes as TensorFlow's object detection API lays them out: scales 0.2 .. 0.95 spread linearly over
    the maps, ratios 1, 2, 1/2, 3, 1/3 plus one box between two scales; the first map only 3 boxes
    (scale 0.1, ratios 1, 2, 1/2). 2034 boxes at 320 px.

    The input (RGB in [0, 1]) is mapped to [-1, 1], MobileNetV2's normalisation.

    Args:
        weights: MobileNetV2's weights: None (random), ``imagenet`` (downloaded by Keras) or the path
            of a weights file for ``include_top=False``.

    Raises:
        ValueError: a size below 32, classes < 1, width <= 0.
    """
    _check_common(classes, width)
    size = check_size("SSDLite-MobileNetV2", input_size, mobilenet_feature_sizes, 32)
    classes = int(classes)
    inputs = keras.Input((size, size, 3), name="image")
    x = L.Rescaling(2.0, offset=-1.0, name="preprocess")(inputs)
    backbone = keras.applications.MobileNetV2(input_tensor=x, alpha=width, include_top=False, weights=weights)
    sources = [("block_13", backbone.get_layer("block_13_expand_relu").output),
               ("out", backbone.get_layer("out_relu").output)]

    def bn_relu(x, name):
        x = L.BatchNormalization(epsilon=1e-3, momentum=0.99, name=f"{name}_bn")(x)
        return L.ReLU(6.0, name=f"{name}_relu")(x)

    x = sources[-1][1]
    for k, depth in enumerate((512, 256, 256, 128), start=1):
        x = bn_relu(L.Conv2D(round_filters(depth // 2, width), 1, use_bias=False, name=f"extra_{k}_1x1")(x),
                    f"extra_{k}_1x1")
        x = bn_relu(L.DepthwiseConv2D(3, 2, padding="same", use_bias=False, name=f"extra_{k}_dw")(x),
                    f"extra_{k}_dw")
        x = bn_relu(L.Conv2D(round_filters(depth, width), 1, use_bias=False, name=f"extra_{k}")(x), f"extra_{k}")
        sources.append((f"extra_{k}", x))
    scales = [0.2 + 0.75 * k / 5 for k in range(6)] + [1.0]
    priors = [{"min_size": 0.1, "max_size": None, "aspect_ratios": [2.0], "step": None, "offset": 0.5}]
    priors += [{"min_size": scales[k], "max_size": scales[k + 1], "aspect_ratios": [2.0, 3.0], "step": None,
                "offset": 0.5} for k in range(1, 6)]
    level = {source: k for k, (source, _) in enumerate(sources)}

    def predictor(tensor, channels, source, kind):
        stem = f"{kind}_{level[source]}"
        x = bn_relu(L.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{stem}_dw")(tensor), f"{stem}_dw")
        return L.Conv2D(channels, 1, name=stem)(x)

    output = _multibox(sources, priors, classes, names, ["out_relu"], predictor)
    return keras.Model(inputs, output, name=name)
