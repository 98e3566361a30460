"""Post-training quantization options: cross-layer equalisation keeps the float function, bias
correction subtracts the hand-computed mean shift, per-tensor conversion has one scale per kernel."""

import numpy as np
import pytest

from kprune._keras import keras
from kprune.darknet.builder import build_model
from kprune.export.ptq import check_ptq, correct_biases, equalizable_pairs, equalize, prepare, quantize_kernel
from kprune.export.tflite import convert
from tests.conftest import cfg_path, randomize


def _flat(outputs):
    return [o.numpy() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def test_equalised_yolov2_computes_the_same_in_float():
    model = build_model(cfg_path("yolov2"), input_size=64, width=0.125, classes=5)
    randomize(model, seed=8, scale=0.1)
    for layer in model.layers:  # channels of very different ranges, as equalisation is for
        if isinstance(layer, keras.layers.Conv2D):
            kernel = layer.kernel.numpy()
            layer.kernel.assign(kernel * np.geomspace(0.05, 5.0, kernel.shape[-1], dtype=np.float32))
    equalised, report = equalize(model)
    pairs = [tuple(p) for p in report["pairs"]]
    # conv -> bn -> leaky (-> maxpool) -> conv chains pair up; not conv_24 (its output is read by the
    # next conv and the route: a fan-out), conv_26 (its output goes through the Reorg, which moves
    # channels) nor the head conv_30 (a model output)
    assert ("conv_0", "conv_2") in pairs and ("conv_2", "conv_4") in pairs and ("conv_29", "conv_30") in pairs
    assert not any(first in ("conv_26", "conv_30", "conv_24") for first, _ in pairs)
    assert report["range_ratio_after"] < 0.5 * report["range_ratio_before"]
    x = np.random.default_rng(9).random((2, 64, 64, 3)).astype(np.float32)
    expected, got = _flat(model(x))[0], _flat(equalised(x))[0]
    assert np.max(np.abs(expected)) > 0.1
    assert np.max(np.abs(expected - got)) < 1e-4 * max(1.0, np.max(np.abs(expected)))


def test_pairs_stop_at_fan_out_and_non_homogeneous_layers():
    inputs = keras.Input((8, 8, 2))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    leaky = keras.layers.LeakyReLU(0.1, name="leaky")(a)
    b = keras.layers.Conv2D(4, 1, name="b")(leaky)
    sig = keras.layers.Activation("sigmoid", name="sig")(b)
    c = keras.layers.Conv2D(4, 1, name="c")(sig)  # b -> sigmoid -> c: sigmoid(s x) != s sigmoid(x)
    d = keras.layers.Conv2D(4, 1, name="d")(c)
    e = keras.layers.Conv2D(4, 1, name="e")(c)  # c feeds d and e: a fan-out
    model = keras.Model(inputs, keras.layers.Concatenate()([d, e]))
    assert equalizable_pairs(model) == [("a", "b")]


def test_bias_correction_by_hand():
    # one 1x1 conv, 2 inputs -> 1 output; inputs constant per channel (means 1 and 3)
    inputs = keras.Input((4, 4, 2))
    conv = keras.layers.Conv2D(1, 1, name="conv")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.array([0.5, 0.0031], np.float32).reshape(1, 1, 2, 1)
    conv.set_weights([kernel, np.array([0.25], np.float32)])
    # per-channel int8: scale 0.5 / 127; 0.5 -> 127 exactly, 0.0031 -> round(0.78740) = 1 -> 0.0039370
    np.testing.assert_allclose(quantize_kernel(kernel).ravel(), [0.5, 0.5 / 127], rtol=1e-12)
    images = np.stack([np.ones((4, 4, 2)) * [1.0, 3.0]] * 3).astype(np.float32)
    corrected, report = correct_biases(model, images)
    shift = (0.5 / 127 - 0.0031) * 3.0  # E[(W_q - W) x] = error of weight 2 times mean of input 2
    assert corrected.get_layer("conv").bias.numpy()[0] == pytest.approx(0.25 - shift, abs=1e-7)
    assert report["convs"] == 1 and report["mean_abs_correction"] == pytest.approx(abs(shift), rel=1e-5)
    # per tensor the scale is the same here (one output channel)
    assert corrected.get_layer("conv").kernel.numpy() == pytest.approx(kernel)


def test_per_tensor_conversion_has_one_scale_per_kernel_and_options_are_checked():
    from ai_edge_litert.interpreter import Interpreter

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.LeakyReLU(0.1)(keras.layers.Conv2D(8, 3, padding="same", name="conv_a")(inputs))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="conv_b")(x))
    randomize(model, seed=10, scale=0.1)
    images = np.random.default_rng(11).random((4, 16, 16, 3)).astype(np.float32)
    scales = {}
    for per_channel in (True, False):
        interpreter = Interpreter(model_content=convert(model, "int8", images, per_channel=per_channel))
        scales[per_channel] = [len(d["quantization_parameters"]["scales"]) for d in interpreter.get_tensor_details()
                               if d["dtype"] == np.int8 and len(d["shape"]) == 4 and d["shape"][0] > 1
                               and len(d["quantization_parameters"]["scales"]) >= 1 and "conv" in d["name"].lower()]
    assert max(scales[True]) > 1 and set(scales[False]) == {1}
    assert check_ptq(["bias-correction", "equalize"]) == ("equalize", "bias-correction")
    with pytest.raises(ValueError, match="'per-layer'.*choose from equalize, bias-correction, per-tensor"):
        check_ptq(["per-layer"])
    with pytest.raises(ValueError, match="needs calibration images"):
        prepare(model, ["bias-correction"], None)
