"""TFLite export of the AlexeyAB fork's models: YOLOv4-tiny and YOLOv7-tiny in every quantization mode
against Keras, and the TFLite ops the fork's pieces (channel split, SPP, mish, swish, logistic)
become, float and full-integer."""

import collections
import json

import numpy as np
import pytest

from kprune import detectors
from kprune._keras import keras, tf
from kprune.darknet.builder import build_model
from kprune.export.tflite import calibration_images, convert, with_integer_mish
from kprune.models.io import load_model, save_model
from kprune.models.layers import Mish
from kprune.models.litert import TFLiteRunner, operators
from tests.conftest import randomize

# max |TFLite - Keras| / std of the Keras outputs, on the 8 validation images of tiny_synth_data.
# Measured (yolov4-tiny, yolov7-tiny): none 1.6e-6, 1.0e-5; fp16 6.5e-4, 7.7e-4; dynamic 0.013, 0.012;
# int8 0.022, 0.18 (yolov7-tiny's logistic heads: their outputs sit near 0.5 with a std of 0.012, and
# TFLite's int8 LOGISTIC has the fixed output step 1/256, so half a step is already 0.17 std).
# float32: rounding only; fp16: half-precision weights (11-bit mantissa, 5e-4 relative each);
# dynamic: int8 weights and int8 activations inside each conv; int8: everything in 8 bits.
BOUNDS = {"none": 1e-4, "fp16": 5e-3, "dynamic": 0.05, "int8": 0.1}
INT8_LOGISTIC_STEP = 1 / 256
_exports = {}


def _export(keras_path, data, out, quant):
    from click.testing import CliRunner

    from kprune.cli import main

    result = CliRunner().invoke(main, ["export", str(keras_path), "--quant", quant, "--data", data,
                                       "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_synth_data):
    """``exported(name, quant)``: ``kprune export`` of the seeded random fork model (96 px, width 0.25,
    5 classes, weights as the YOLOv2/v3 export tests randomize them), converted once per module:
    the report, the .tflite bytes and the Keras outputs on the check images."""
    folder = tmp_path_factory.mktemp("fork-export")

    def get(name, quant):
        if (name, quant) not in _exports:
            keras_path = folder / f"{name}.keras"
            if not keras_path.exists():
                model = detectors.build(name, input_size=96, classes=5, width=0.25)
                randomize(model, seed=7, scale=0.05)
                save_model(model, keras_path)
            out = folder / f"{name}-{quant}.tflite"
            report = _export(keras_path, tiny_synth_data, out, quant)
            images = calibration_images(tiny_synth_data, 8, "val", 96)
            expected = [o.numpy() for o in tf.nest.flatten(load_model(keras_path)(images))]
            _exports[name, quant] = report, out.read_bytes(), expected
        return _exports[name, quant]

    yield get
    _exports.clear()


@pytest.mark.parametrize("name, quant", [
    *[("yolov4-tiny", quant) for quant in ("none", "fp16", "dynamic", "int8")],
    # yolov7-tiny's float, fp16 and dynamic figures above were measured once: each conversion of it
    # takes about 13 s, and its int8 file is the one with something of its own to check
    pytest.param("yolov7-tiny", "int8", marks=pytest.mark.slow),
])
def test_fork_tiny_export_matches_keras(exported, name, quant):
    report, content, expected = exported(name, quant)
    std = max(float(e.std()) for e in expected)
    check = report["check"]
    assert check["images"] == 8 and check["on"] == "val images" and report["bytes"] == len(content)
    bound = BOUNDS[quant] * std
    if quant == "int8" and name == "yolov7-tiny":  # logistic heads: one output step of 1/256
        bound = max(bound, INT8_LOGISTIC_STEP)
    assert check["max_abs_diff"] < bound, (check["max_abs_diff"] / std, check)
    heads = json.loads(open(report["metadata_file"]).read())["heads"]
    assert len(heads) == (2 if name == "yolov4-tiny" else 3) and heads[0]["classes"] == 5


def _assert_integer(ops, outputs):
    """Full-integer: a QUANTIZE of the float input first, one DEQUANTIZE per output, and every other
    op on int8 tensors (int32 only for biases, paddings and slice bounds); a QUANTIZE
    between is an int8 -> int8 rescale (before a CONCATENATION of differently scaled inputs)."""
    assert ops[0] == {"op": "QUANTIZE", "inputs": ["float32"], "outputs": ["int8"]}
    dequantize = {"op": "DEQUANTIZE", "inputs": ["int8"], "outputs": ["float32"]}
    assert ops.count(dequantize) == outputs
    for op in ops[1:]:
        assert op == dequantize or  op["outputs"] == ["int8"] and set(op["inputs"]) <= {"int8", "int32"}, op


@pytest.mark.parametrize("name, split, pools, logistic", [
    pytest.param("yolov4-tiny", 3, 3, 0),
    pytest.param("yolov7-tiny", 0, 6, 3, marks=pytest.mark.slow),  # 3 stride-2 pools + SPP 5, 9, 13
])
def test_fork_tiny_int8_is_integer(exported, name, split, pools, logistic):
    _, content, expected = exported(name, "int8")
    ops = operators(content)
    _assert_integer(ops, len(expected))
    counts = collections.Counter(op["op"] for op in ops)
    # the [route] groups=2 split is a STRIDED_SLICE; every pool, SPP's included, a MAX_POOL_2D
    assert counts["STRIDED_SLICE"] == split and counts["MAX_POOL_2D"] == pools and counts["LOGISTIC"] == logistic
    assert set(counts) <= {"QUANTIZE", "PAD", "CONV_2D", "LEAKY_RELU", "STRIDED_SLICE", "CONCATENATION",
                           "MAX_POOL_2D", "RESIZE_NEAREST_NEIGHBOR", "LOGISTIC", "DEQUANTIZE"}, counts


PIECES_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=mish

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=swish

[route]
layers=-1
groups=2
group_id=1

[maxpool]
size=5
stride=1

[route]
layers=-1,-3

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=logistic

[yolo]
mask=0,1,2
anchors=10,13, 16,30, 33,23
classes=2
num=3
scale_x_y=2.0
new_coords=1
"""


def test_fork_pieces_become_these_ops(tmp_path):
    (tmp_path / "pieces.cfg").write_text(PIECES_CFG)
    model = build_model(tmp_path / "pieces.cfg")
    randomize(model, seed=3, scale=0.3)
    images = np.random.default_rng(1).random((16, 32, 32, 3)).astype(np.float32)
    expected = model(images[:8]).numpy()
    float_ops = operators(convert(model))
    assert [op["op"] for op in float_ops] == [
        "PAD", "CONV_2D",  # the stride-2 conv pads explicitly, as Darknet does
        "EXP", "ADD", "LOG", "TANH", "MUL",  # mish: x * tanh(log(exp(x) + 1))
        "CONV_2D", "LOGISTIC", "MUL",  # swish: x * sigmoid(x)
        "STRIDED_SLICE", "MAX_POOL_2D", "CONCATENATION",  # groups=2 group_id=1; SPP's size-5 pool
        "CONV_2D", "LOGISTIC"]  # the new_coords head applies the logistic itself
    content = convert(model, "int8", images)
    ops = operators(content)
    _assert_integer(ops, 1)
    assert [op["op"] for op in ops[3:12]] == ["RELU", "MUL", "SUB", "EXP", "ADD", "LOG", "ADD", "TANH", "MUL"]
    got = TFLiteRunner(content, model)(images[:8])[0]
    # measured 0.054 on sigmoid outputs: int8 LOGISTIC steps are 1/256, the error of the layers
    # before grows through the sigmoid's slope
    assert np.abs(got - expected).max() < 0.1


def test_mish_layer_is_keras_mish_and_stays_accurate_in_int8(tmp_path):
    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(16, 3, padding="same", kernel_initializer=keras.initializers.RandomNormal(0, 1.0, seed=1),
                               bias_initializer=keras.initializers.RandomNormal(-0.5, 0.5, seed=2))(inputs)
    model = keras.Model(inputs, keras.layers.Activation("mish", name="mish_1")(conv))
    replaced = with_integer_mish(model)
    assert isinstance(replaced.get_layer("mish_1"), Mish) and with_integer_mish(replaced) is replaced
    images = np.random.default_rng(0).random((32, 16, 16, 3)).astype(np.float32)
    expected = model(images[:8]).numpy()
    np.testing.assert_allclose(replaced(images[:8]).numpy(), expected, atol=2e-6)
    save_model(replaced, tmp_path / "m.keras")  # safe_mode round trip
    np.testing.assert_array_equal(load_model(tmp_path / "m.keras")(images[:8]).numpy(), replaced(images[:8]).numpy())
    step = 2 * np.abs(expected).max() / 255  # one int8 step of the output range
    # Keras' mish as TFLite lowers it (exp(x) in one int8 tensor up to exp(11)) is wrong by many
    # steps; kprune's int8 conversion swaps in Mish, within a few steps
    plain = tf.lite.TFLiteConverter.from_keras_model(model)
    plain.optimizations = [tf.lite.Optimize.DEFAULT]
    plain.representative_dataset = lambda: ([image[None]] for image in images)
    plain.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    naive = np.abs(TFLiteRunner(plain.convert(), model)(images[:8])[0] - expected).max()
    ours = np.abs(TFLiteRunner(convert(model, "int8", images), model)(images[:8])[0] - expected).max()
    assert naive > 20 * step and ours < 3 * step, (naive / step, ours / step)
