"""Builder: exact parameter counts and FLOPs of the six cfgs, overrides, names, Darknet padding."""

import numpy as np
import pytest

from kprune._keras import keras
from kprune.darknet.builder import build_model, round_filters
from kprune.darknet.cfg import CfgError, parse_cfg
from kprune.models.counting import count_flops, count_params
from tests.conftest import cfg_path, randomize

# DESIGN.md: params as stored in .weights, Keras trainable / non-trainable, Darknet BFLOPs.
REFERENCE = {
    "yolov2": (608, 50_983_561, 50_962_889, 20_672, 62.94),
    "yolov2-voc": (416, 50_676_061, 50_655_389, 20_672, 29.36),
    "yolov2-tiny": (416, 11_237_145, 11_232_057, 5_088, 5.41),
    "yolov2-tiny-voc": (416, 15_867_885, 15_861_773, 6_112, 6.97),
    "yolov3": (608, 62_001_757, 61_949_149, 52_608, 140.69),
    "yolov3-tiny": (416, 8_858_734, 8_852_366, 6_368, 5.56),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_counts(name):
    size, params, trainable, non_trainable, bflops = REFERENCE[name]
    model = build_model(cfg_path(name))
    assert model.input_shape == (None, size, size, 3)
    counts = count_params(model)
    assert (counts["params"], counts["trainable_params"], counts["non_trainable_params"]) == (
        params, trainable, non_trainable)
    assert count_flops(model) / 1e9 == pytest.approx(bflops, rel=1e-3)


def test_yolov2_flops_at_416():
    assert count_flops(build_model(cfg_path("yolov2"), input_size=416)) / 1e9 == pytest.approx(29.46, rel=1e-3)


def test_layer_names_follow_cfg_indices():
    model = build_model(cfg_path("yolov2"), input_size=320)
    names = {layer.name for layer in model.layers}
    for expected in ("conv_0", "bn_0", "leaky_0", "maxpool_1", "conv_26", "reorg_27", "route_28", "conv_30",
                     "region_31"):
        assert expected in names
    assert "route_25" not in names  # a route of one layer is that layer's output
    assert model.get_layer("route_28").output_shape == (None, 10, 10, 1280)
    assert model.get_layer("conv_30").use_bias and not model.get_layer("conv_29").use_bias
    assert model.output_shape == (None, 10, 10, 425)


def test_overrides_classes_width_size():
    model = build_model(cfg_path("yolov2-tiny"), input_size=224, classes=3, width=0.25)
    assert model.input_shape == (None, 224, 224, 3)
    filters = [model.get_layer(f"conv_{i}").filters for i in (0, 2, 4, 6, 8, 10, 12, 13, 14)]
    # 16, 32, 64, 128, 256, 512, 1024, 512 scaled by 0.25 and rounded to multiples of 8 (>= 8);
    # the head conv gets 5 anchors x (5 + 3 classes) = 40 filters.
    assert filters == [8, 8, 16, 32, 64, 128, 256, 128, 40]
    head = model.get_layer("region_15")
    assert head.classes == 3 and head.channels == 40


def test_round_filters():
    assert [round_filters(f, 0.3) for f in (16, 32, 64, 1024)] == [8, 8, 16, 304]
    assert round_filters(64, 1.0) == 64


@pytest.mark.parametrize("size", [100, 0, -32, 33])
def test_bad_input_size(size):
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model(cfg_path("yolov2-tiny"), input_size=size)


def test_yolo_head_filters_follow_mask_for_new_classes():
    model = build_model(cfg_path("yolov3-tiny"), input_size=128, classes=5)
    assert [o[-1] for o in model.output_shape] == [30, 30]  # 3 anchors x (5 + 5)


def _darknet_conv_reference(x, kernel, stride, pad):
    """Darknet's convolution (im2col): pad `pad` zeros on every side, windows from the top-left."""
    n, h, w, c = x.shape
    k = kernel.shape[0]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((n, out_h, out_w, kernel.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, i * stride: i * stride + k, j * stride: j * stride + k, :]
            out[:, i, j, :] = np.tensordot(window, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize("size, stride, height, width", [(3, 2, 32, 32), (3, 2, 32, 64), (5, 2, 64, 32), (3, 1, 32, 32)])
def test_conv_padding_matches_darknet(size, stride, height, width):
    cfg = parse_cfg(f"[net]\nwidth={width}\nheight={height}\nchannels=2\n[convolutional]\nfilters=3\n"
                    f"size={size}\nstride={stride}\npad=1\nactivation=linear\n")
    model = build_model(cfg)
    randomize(model, seed=1)
    x = np.random.default_rng(2).normal(size=(1, height, width, 2)).astype(np.float32)
    conv = model.get_layer("conv_0")
    expected = _darknet_conv_reference(x.astype(np.float64), conv.kernel.numpy().astype(np.float64), stride,
                                       size // 2) + conv.bias.numpy()
    got = model(x).numpy()
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) < 1e-4


def test_maxpool_size2_stride1_pads_right_bottom_only():
    cfg = parse_cfg("[net]\nwidth=32\nheight=32\nchannels=1\n[maxpool]\nsize=2\nstride=1\n")
    model = build_model(cfg)
    x = np.random.default_rng(3).normal(size=(1, 32, 32, 1)).astype(np.float32)
    got = model(x).numpy()[0, :, :, 0]
    padded = np.pad(x[0, :, :, 0], ((0, 1), (0, 1)), constant_values=-np.inf)
    expected = np.maximum.reduce([padded[:-1, :-1], padded[1:, :-1], padded[:-1, 1:], padded[1:, 1:]])
    np.testing.assert_array_equal(got, expected)


def test_maxpool_without_keras_equivalent_is_refused():
    cfg = parse_cfg("[net]\nwidth=32\nheight=32\nchannels=1\n[maxpool]\nsize=3\nstride=2\n", source="p.cfg")
    with pytest.raises(CfgError, match=r"p.cfg:5: \[maxpool\] \(layer 0\).*size=3 stride=2 padding=2"):
        build_model(cfg)


def test_maxpool_padding_zero_is_valid_pooling():
    cfg = parse_cfg("[net]\nwidth=32\nheight=32\nchannels=1\n[convolutional]\nfilters=1\nsize=3\nstride=1\n"
                    "activation=linear\n[maxpool]\nsize=2\nstride=2\npadding=0\n")
    model = build_model(cfg)  # conv without pad: 30 -> Darknet (30 + 0 - 2) / 2 + 1 = 15
    assert model.output_shape == (None, 15, 15, 1)


def test_head_conv_filters_must_fit_the_head():
    cfg = parse_cfg("[net]\nwidth=64\nheight=64\nchannels=3\n[convolutional]\nfilters=999\nactivation=linear\n"
                    "[region]\nanchors=1,1\nclasses=2\nnum=1\nsoftmax=1\n", source="h.cfg")
    with pytest.raises(CfgError, match=r"line 6: filters=999 does not fit the next \[region\]: 1 anchors x \(5 \+ 2"):
        build_model(cfg)
    assert build_model(cfg, classes=3).output_shape == (None, 64, 64, 8)  # an override recomputes them


def test_region_without_softmax_is_refused():
    with pytest.raises(CfgError, match="softmax=0 is not supported"):
        parse_cfg("[net]\nwidth=64\nheight=64\n[convolutional]\nfilters=6\n[region]\nanchors=1,1\nclasses=1\nnum=1\n")


@pytest.mark.parametrize("kwargs, message", [
    ({"width": float("inf")}, "positive finite number"), ({"classes": 2.5}, "whole number"),
    ({"input_size": (64, 64, 3)}, "multiple of 32"), ({"input_size": "64"}, "multiple of 32"),
])
def test_bad_overrides(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg_path("yolov2-tiny"), **kwargs)


def test_tfmot_can_wrap_a_built_model():
    import tensorflow_model_optimization as tfmot

    model = build_model(cfg_path("yolov2"), input_size=64, width=0.125, classes=2)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model)
    wrapped = [layer.layer.name for layer in pruned.layers if hasattr(layer, "pruning_vars")]
    assert "conv_0" in wrapped and "reorg_27" in wrapped and "bn_0" in wrapped
    assert len([name for name in wrapped if name.startswith("conv_")]) == 23


def test_build_errors_name_the_layer():
    cfg = parse_cfg("[net]\nwidth=64\nheight=64\nchannels=3\n[convolutional]\nfilters=8\n"
                    "[convolutional]\nfilters=16\n[shortcut]\nfrom=-2\n", source="bad.cfg")
    with pytest.raises(CfgError, match=r"bad.cfg:9: \[shortcut\] \(layer 2\).*shapes must match"):
        build_model(cfg)


def test_head_must_follow_a_conv():
    cfg = parse_cfg("[net]\nwidth=64\nheight=64\nchannels=3\n[maxpool]\nstride=2\n[region]\nanchors=1,1\nsoftmax=1\n")
    with pytest.raises(CfgError, match=r"\[region\] \(layer 1\).*follow a \[convolutional\]"):
        build_model(cfg)


def test_functional_model_has_no_lambda():
    model = build_model(cfg_path("yolov3-tiny"), input_size=64)
    assert isinstance(model, keras.Model) and model.__class__.__name__ == "Functional"
    assert "Lambda" not in {type(layer).__name__ for layer in model.layers}
