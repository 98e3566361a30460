"""AlexeyAB's fork of Darknet: the five cfgs (yolov4-tiny, yolov7-tiny, yolov4, yolov4-csp, yolov7) build
with the fork's exact counts, and their models compute what the fork computes.

The forward-pass reference below is a slow numpy Darknet written from the layers' definitions (route
with groups, mish, swish, maxpool with Darknet's padding, the fork's batch norm, ...), fed the same
random .weights file in Darknet's own layout as the Keras model.
"""

import numpy as np
import pytest
from click.testing import CliRunner

from kprune import detectors
from kprune._keras import keras
from kprune.cli import main
from kprune.darknet import builder
from kprune.darknet.builder import build_model
from kprune.darknet.cfg import (ACTIVATIONS, TRAINING_ONLY_KEYS, CfgError, default_bn_formula, fork_features,
                                parse_cfg, read_cfg)
from kprune.darknet.convert import load_darknet
from kprune.darknet.weights import WeightsHeader, load_weights, read_header, weights_bytes
from kprune.models.counting import count_flops, count_params
from kprune.models.io import load_model, save_model
from kprune.models.layers import ChannelSlice, DarknetBatchNormalization, DetectionHead, detection_heads
from kprune.train import TrainConfig
from kprune.train.detector import build_detector
from tests.conftest import CFG_DIR, REPO, cfg_path

# the fork's cfgs beside the repository, else the zoo's copies (test_zoo checks they are the same files)
FORK_DIR = CFG_DIR / "alexeyab" if (CFG_DIR / "alexeyab").is_dir() else REPO / "kprune" / "models" / "cfg"
ORIGINAL = ("yolov2", "yolov2-voc", "yolov2-tiny", "yolov2-tiny-voc", "yolov3", "yolov3-tiny")

# the fork's figures: cfg size, params as stored in .weights, conv BFLOPs (2 x MAC) at the cfg size
REFERENCE = {
    "yolov4-tiny": (416, 6_062_814, 6.905),
    "yolov7-tiny": (416, 6_241_885, 5.783),
    "yolov4": (608, 64_429_405, 128.39),
    "yolov4-csp": (512, 52_986_205, 76.94),
    "yolov7": (640, 36_974_557, 104.50),
}

def fork_cfg(name: str) -> str:
    return str(FORK_DIR / f"{name}.cfg")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_counts(name):
    size, params, bflops = REFERENCE[name]
    model = build_model(fork_cfg(name))  # graph only, no forward pass
    assert model.input_shape == (None, size, size, 3)
    assert count_params(model)["params"] == params
    assert count_flops(model) / 1e9 == pytest.approx(bflops, rel=1e-3)


def test_yolov4_tiny_split_is_half_of_the_channels():
    """Without groups= the route would pass all 64 channels on, and the model would have 6,256,350
    parameters."""
    cfg = read_cfg(fork_cfg("yolov4-tiny"))
    route = cfg.layers[3]
    assert (route.kind, route["layers"], route["groups"], route["group_id"]) == ("route", [2], 2, 1)
    model = build_model(cfg, input_size=128)
    split = model.get_layer("route_3")
    assert isinstance(split, ChannelSlice) and (split.groups, split.group_id) == (2, 1)
    assert model.get_layer("conv_2").output_shape == (None, 32, 32, 64)
    assert split.output_shape == (None, 32, 32, 32)


def test_every_key_of_the_ten_cfgs_is_used_or_training_only():
    for path in [*(fork_cfg(n) for n in REFERENCE), *(cfg_path(n) for n in ORIGINAL)]:
        cfg = read_cfg(path)  # would raise on any other key
        unused = {(s.kind, k) for s in [cfg.net, *cfg.layers] for k in s.raw if k not in s.params}
        assert all(key in TRAINING_ONLY_KEYS[kind] for kind, key in unused), path


def test_fork_cfgs_take_the_fork_formula_and_original_cfgs_theirs():
    for name in REFERENCE:
        cfg = read_cfg(fork_cfg(name))
        assert default_bn_formula(cfg) == "alexeyab" and fork_features(cfg), name
    for name in ORIGINAL:
        assert default_bn_formula(read_cfg(cfg_path(name))) == "original" and not fork_features(read_cfg(cfg_path(name)))
    features = fork_features(read_cfg(fork_cfg("yolov4-csp")))
    assert [f.split(".cfg:", 1)[1] for f in features[:3]] == [
        "1: [net] (net), line 25: mosaic=1", "1: [net] (net), line 27: letter_box=1",
        "1: [net] (net), line 29: ema_alpha=0.9998"]
    assert any(f.endswith(": activation=mish") for f in features)
    model = build_model(fork_cfg("yolov4-tiny"), input_size=64)
    assert {layer.formula for layer in model.layers if isinstance(layer, DarknetBatchNormalization)} == {"alexeyab"}
    model = build_model(fork_cfg("yolov4-tiny"), input_size=64, bn_formula="original")
    assert {layer.formula for layer in model.layers if isinstance(layer, DarknetBatchNormalization)} == {"original"}
    with pytest.raises(ValueError, match="formula 'caffe' is not one of original, alexeyab"):
        build_model(fork_cfg("yolov4-tiny"), input_size=64, bn_formula="caffe")


def test_builder_knows_the_parser_activations():
    assert set(builder._ACTIVATIONS) | {"linear"} == set(ACTIVATIONS)


def test_head_metadata_scale_x_y_and_new_coords_travel_in_the_keras_file(tmp_path):
    model = build_model(fork_cfg("yolov7-tiny"), input_size=64)
    heads = detection_heads(model)
    assert [(h.scale_x_y, h.new_coords, h.mask) for h in heads] == [
        (2.0, 1, [0, 1, 2]), (2.0, 1, [3, 4, 5]), (2.0, 1, [6, 7, 8])]
    save_model(model, tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")  # safe_mode=True: no Lambda layers
    assert [(h.scale_x_y, h.new_coords) for h in detection_heads(loaded)] == [(2.0, 1)] * 3
    assert detection_heads(loaded)[0].loss_settings == {"iou_loss": "ciou", "iou_normalizer": 0.05,
                                                        "cls_normalizer": 0.5, "obj_normalizer": 1.0}
    metadata = detectors.family_of(loaded).export_metadata(loaded)  # what the phone side decodes with
    assert [(h["scale_x_y"], h["new_coords"]) for h in metadata["heads"]] == [(2.0, 1)] * 3
    tiny4 = detection_heads(build_model(fork_cfg("yolov4-tiny"), input_size=64))
    assert [(h.scale_x_y, h.new_coords) for h in tiny4] == [(1.05, 0), (1.05, 0)]
    v3 = detection_heads(build_model(cfg_path("yolov3-tiny"), input_size=64))
    assert [(h.scale_x_y, h.new_coords) for h in v3] == [(1.0, 0), (1.0, 0)]
    with pytest.raises(ValueError, match="region head has no scale_x_y"):
        DetectionHead("region", [[1, 1]], 2, scale_x_y=1.1)


def test_custom_layers_round_trip_their_config():
    layer = ChannelSlice.from_config(ChannelSlice(4, 3, name="s").get_config())
    assert (layer.groups, layer.group_id, layer.name) == (4, 3, "s")
    bn = DarknetBatchNormalization.from_config(DarknetBatchNormalization(formula="alexeyab", name="b").get_config())
    assert (bn.formula, bn.epsilon) == ("alexeyab", 1e-5)
    assert DarknetBatchNormalization().epsilon == 1e-6
    head = DetectionHead.from_config(DetectionHead("yolo", [[1, 2], [3, 4]], 2, mask=[1], scale_x_y=1.05,
                                                   new_coords=1).get_config())
    assert (head.scale_x_y, head.new_coords, head.mask) == (1.05, 1, [1])
    with pytest.raises(ValueError, match="group_id=2 of groups=2"):
        ChannelSlice(2, 2)
    with pytest.raises(ValueError, match="6 channels do not split into 4"):
        ChannelSlice(4, 0)(keras.Input((2, 2, 6)))


def test_both_batch_norm_formulas_by_hand_on_a_small_variance_channel():
    # channel 0: variance 1e-6, gamma 1, beta 0, mean 0, x = 1e-3:
    #   original: 1e-3 / (sqrt(1e-6) + 1e-6) = 1e-3 / 1.001e-3 = 0.999000999...
    #   alexeyab: 1e-3 / sqrt(1e-6 + 1e-5) = 1e-3 / sqrt(1.1e-5) = 0.301511344...
    # channel 1: variance 4 (the formulas agree to 1e-6): (3 - 1) / 2 * 0.5 + 0.25 = 0.75
    x = np.array([[[[1e-3, 3.0]]]], dtype=np.float32)
    expected = {"original": [0.999000999, 0.75], "alexeyab": [0.301511344, 0.75]}
    for formula, values in expected.items():
        layer = DarknetBatchNormalization(formula=formula)
        layer.build((None, 1, 1, 2))
        layer.set_weights([np.float32([1.0, 0.5]), np.float32([0.0, 0.25]), np.float32([0.0, 1.0]),
                           np.float32([1e-6, 4.0])])
        np.testing.assert_allclose(layer(x, training=False).numpy()[0, 0, 0], values, rtol=1e-5)


def test_unknown_key_in_a_fork_cfg_names_key_section_index_and_line(tmp_path):
    lines = open(fork_cfg("yolov4-tiny")).read().splitlines()
    at = lines.index("group_id=1")  # the first [route] with groups, layer 3
    lines.insert(at + 1, "stream=1")
    path = tmp_path / "odd.cfg"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CfgError) as info:
        read_cfg(path)
    message = str(info.value)
    assert f"odd.cfg:{at - 2}: [route] (layer 3), line {at + 2}: unknown key 'stream' in [route]" in message
    assert "group_id" in message  # the known keys are listed


# ---------------------------------------------------------------------------------------------------
# A slow Darknet in numpy, written from the definitions (NCHW, one image, float64).

def _leaky(x):
    return np.where(x > 0, x, 0.1 * x)


REF_ACTIVATIONS = {
    "linear": lambda x: x,
    "leaky": _leaky,
    "relu": lambda x: np.maximum(x, 0),
    "logistic": lambda x: 1 / (1 + np.exp(-x)),
    "mish": lambda x: x * np.tanh(np.logaddexp(0, x)),  # x * tanh(softplus(x))
    "swish": lambda x: x / (1 + np.exp(-x)),  # x * sigmoid(x)
}
REF_BN = {
    "original": lambda var: np.sqrt(var) + 1e-6,
    "alexeyab": lambda var: np.sqrt(var + 1e-5),
}


class _Weights:
    """Random Darknet weights, drawn as the reference needs them and kept in .weights order."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.chunks = []

    def take(self, shape, values):
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        self.chunks.append(values.tobytes())
        return values.astype(np.float64)

    def conv(self, n, c, k, batch_normalize):
        rng = self.rng
        biases = self.take((n,), rng.normal(0, 0.1, n))
        if batch_normalize:
            # a tenth of the channels with a tiny variance, where the two formulas differ; gamma scaled
            # with the standard deviation keeps every channel's output of order one
            variance = np.where(rng.random(n) < 0.1, rng.uniform(1e-7, 1e-5, n), rng.uniform(0.5, 2.0, n))
            scales = self.take((n,), np.sqrt(variance) * rng.uniform(0.5, 1.5, n))
            mean = self.take((n,), rng.normal(0, 0.1, n))
            variance = self.take((n,), variance)
        weights = self.take((n, c, k, k), rng.normal(0, 1 / np.sqrt(c * k * k), (n, c, k, k)))
        return biases, (scales, mean, variance) if batch_normalize else None, weights

    def file_bytes(self, header=WeightsHeader(0, 2, 5, 32013312)):
        return header.to_bytes() + b"".join(self.chunks)


def _ref_conv(x, weights, stride, pad):
    n, c, k, _ = weights.shape
    _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    columns = np.empty((c, k, k, out_h, out_w))
    for dy in range(k):
        for dx in range(k):
            columns[:, dy, dx] = padded[:, dy: dy + stride * (out_h - 1) + 1: stride,
                                        dx: dx + stride * (out_w - 1) + 1: stride]
    return (weights.reshape(n, -1) @ columns.reshape(c * k * k, -1)).reshape(n, out_h, out_w)


def _ref_maxpool(x, size, stride, padding):
    """Darknet's maxpool: output side (h + padding - size) // stride + 1, windows starting at
    -padding // 2 + i * stride, positions outside the image ignored."""
    c, h, w = x.shape
    out_h, out_w = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    out = np.full((c, out_h, out_w), -np.inf)
    offset = -(padding // 2)
    for i in range(out_h):
        for j in range(out_w):
            for dy in range(size):
                for dx in range(size):
                    y, z = offset + i * stride + dy, offset + j * stride + dx
                    if 0 <= y < h and 0 <= z < w:
                        out[:, i, j] = np.maximum(out[:, i, j], x[:, y, z])
    return out


def reference_forward(cfg, image_chw, formula, seed=0):
    """The raw outputs (C, H, W) of the layers feeding the heads, and the .weights bytes used."""
    weights = _Weights(seed)
    outputs, heads = [], []
    x = image_chw.astype(np.float64)
    for s in cfg.layers:
        if s.kind == "convolutional":
            k = s["size"]
            biases, bn, kernel = weights.conv(s["filters"], x.shape[0], k, s["batch_normalize"])
            x = _ref_conv(x, kernel, s["stride"], k // 2 if s["pad"] else s["padding"])
            if bn is not None:
                scales, mean, variance = bn
                x = (x - mean[:, None, None]) / REF_BN[formula](variance)[:, None, None] * scales[:, None, None]
            x = REF_ACTIVATIONS[s["activation"]](x + biases[:, None, None])
        elif s.kind == "maxpool":
            x = _ref_maxpool(x, s["size"], s["stride"], s["padding"])
        elif s.kind == "route":
            parts = []
            for j in s["layers"]:  # slice group_id of groups of every listed layer: a contiguous run of channels
                source = outputs[j]
                part = source.shape[0] // s["groups"]
                parts.append(source[s["group_id"] * part: (s["group_id"] + 1) * part])
            x = np.concatenate(parts, axis=0)
        elif s.kind == "shortcut":
            x = REF_ACTIVATIONS[s["activation"]](x + outputs[s["from"]])
        elif s.kind == "upsample":
            x = x.repeat(s["stride"], axis=1).repeat(s["stride"], axis=2)
        elif s.kind == "yolo":
            heads.append(x)
        else:
            raise AssertionError(f"the reference has no [{s.kind}]")
        outputs.append(x)
    return heads, weights.file_bytes()


def _compare(name, size, tmp_path):
    cfg = read_cfg(fork_cfg(name))
    height, width = size
    image = np.random.default_rng(7).uniform(0, 1, (3, height, width))
    expected, data = reference_forward(builder.adapt_cfg(cfg, input_size=size), image, "alexeyab")
    path = tmp_path / f"{name}.weights"
    path.write_bytes(data)
    model = build_model(cfg, input_size=size)
    assert load_weights(model, path) == WeightsHeader(0, 2, 5, 32013312)
    x = image.transpose(1, 2, 0)[None].astype(np.float32)
    got = [o[0].transpose(2, 0, 1) for o in model.predict(x, verbose=0)]
    ratios = [np.max(np.abs(g - e)) / np.std(e) for g, e in zip(got, expected)]
    other = build_model(cfg, input_size=size, bn_formula="original")
    load_weights(other, path)
    wrong = [o[0].transpose(2, 0, 1) for o in other.predict(x, verbose=0)]
    return ratios, [np.max(np.abs(g - e)) / np.std(e) for g, e in zip(wrong, expected)], model, data


@pytest.mark.parametrize("name, size", [("yolov4-tiny", (64, 96)), ("yolov7-tiny", (96, 64))])
def test_tiny_forward_matches_numpy_darknet_and_weights_round_trip(name, size, tmp_path):
    ratios, wrong, model, data = _compare(name, size, tmp_path)
    assert max(ratios) <= 1e-3, ratios
    assert min(wrong) > 1e-2, wrong  # the original formula is visibly not the fork's on these weights
    assert weights_bytes(model) == data  # written back byte for byte, header 0.2.5 included
    assert read_header(data) == WeightsHeader(0, 2, 5, 32013312)


@pytest.mark.slow  # 37 to 64 million weights drawn, written and loaded: about 10 s each
@pytest.mark.parametrize("name", ["yolov4", "yolov4-csp", "yolov7"])
def test_big_forward_matches_numpy_darknet(name, tmp_path):
    ratios, wrong, model, data = _compare(name, (64, 64), tmp_path)
    assert max(ratios) <= 1e-3, ratios
    assert min(wrong) > 1e-2, wrong
    assert weights_bytes(model) == data


def test_convert_option_overrides_the_formula(tmp_path):
    text = open(fork_cfg("yolov4-tiny")).read().replace("width=416", "width=64").replace("height=416", "height=64")
    cfg = tmp_path / "small.cfg"
    cfg.write_text(text)
    _, data = reference_forward(read_cfg(cfg), np.zeros((3, 64, 64)), "alexeyab", seed=3)
    weights = tmp_path / "small.weights"
    weights.write_bytes(data)
    assert {layer.formula for layer in load_darknet(cfg, weights, bn_formula="original").layers
            if isinstance(layer, DarknetBatchNormalization)} == {"original"}
    for args, formula in (([], "alexeyab"), (["--bn-formula", "original"], "original")):
        out = tmp_path / f"{formula}.keras"
        result = CliRunner().invoke(main, ["darknet", "convert", str(cfg), str(weights), str(out), *args])
        assert result.exit_code == 0, result.output
        model = load_model(out)
        assert {layer.formula for layer in model.layers if isinstance(layer, DarknetBatchNormalization)} == {formula}
        assert weights_bytes(model) == data
    config = TrainConfig(cfg=str(cfg), weights=str(weights), bn_formula="original", dataset=str(tmp_path))
    trained, _ = build_detector(config, [f"c{k}" for k in range(80)])  # training a converted model
    assert {layer.formula for layer in trained.layers if isinstance(layer, DarknetBatchNormalization)} == {"original"}
    result = CliRunner().invoke(main, ["darknet", "convert", str(cfg), str(weights), str(out), "--bn-formula", "x"])
    assert result.exit_code != 0 and "'x' is not one of 'original', 'alexeyab'" in result.output


def test_parse_of_a_route_with_groups_over_several_layers():
    cfg = parse_cfg("[net]\nwidth=32\nheight=32\nchannels=3\n[convolutional]\nfilters=8\nsize=1\nactivation=linear\n"
                    "[convolutional]\nfilters=4\nsize=1\nactivation=linear\n[route]\nlayers=-1,-2\ngroups=2\ngroup_id=0\n")
    model = build_model(cfg)
    assert model.output_shape == (None, 32, 32, 6)  # 2 of conv_1's 4 channels, then 4 of conv_0's 8
    assert model.get_layer("route_2_slice_0").output_shape[-1] == 2
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    a, b = keras.Model(model.input, [model.get_layer("conv_1").output, model.get_layer("conv_0").output])(x)
    np.testing.assert_array_equal(model(x).numpy(), np.concatenate([a[..., :2], b[..., :4]], axis=-1))
