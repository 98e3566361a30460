"""The delegate compatibility report of an export: op list with versions, XNNPACK and GPU verdicts,
and the warning that zeroed weights do not make XNNPACK faster."""

import numpy as np
import pytest

from kprune._keras import keras, tf
from kprune.export.compat import GPU_OPS, compatibility, sparse_inference_conditions, text
from kprune.models.litert import delegated_ops, operators


def _tiny(zeros: float = 0.0):
    """3x3 stride-2 conv on RGB, leaky, 1x1 conv, then a REVERSE_V2 (which neither XNNPACK nor the
    GPU delegate takes); ``zeros``: that fraction of every conv kernel set to zero (the smallest)."""
    inputs = keras.Input((16, 16, 3), batch_size=1)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    x = keras.layers.LeakyReLU(0.1)(x)
    x = keras.layers.Conv2D(16, 1)(x)
    outputs = tf.reverse(x, [2])
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = rng.normal(0, 0.1, layer.kernel.shape).astype(np.float32)
            cut = np.quantile(np.abs(kernel), zeros) if zeros else -1.0
            layer.kernel.assign(np.where(np.abs(kernel) <= cut, 0.0, kernel))
    return model


def _convert(model) -> bytes:
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def test_op_list_with_versions_and_verdicts():
    model = _tiny()
    content = _convert(model)
    report = compatibility(content, model)
    assert [(o["op"], o["version"]) for o in report["ops"]] == [
        ("CONV_2D", 1), ("LEAKY_RELU", 1), ("CONV_2D", 1), ("REVERSE_V2", 1)]
    assert [o["xnnpack"] for o in report["ops"]] == [True, True, True, False]
    assert [o["gpu"] for o in report["ops"]] == [True, True, True, False]
    assert report["xnnpack"] == {"taken": 3, "total": 4, "not_taken": ["REVERSE_V2"]}
    assert report["gpu"] == {"taken": 3, "total": 4, "not_taken": ["REVERSE_V2"]}
    assert report["ops"][0]["inputs"] == ["float32", "float32", "float32"]
    assert report["zero_fraction"] == 0.0 and len(report["warnings"]) == 2  # XNNPACK and GPU leave REVERSE_V2
    assert "LEAKY_RELU (1)" in text(report) and "XNNPACK (CPU, this interpreter): 3 of 4 ops; not: REVERSE_V2" in text(report)
    # versions only on request: the plain op list keeps its shape
    assert operators(content)[1] == {"op": "LEAKY_RELU", "inputs": ["float32"], "outputs": ["float32"]}
    assert delegated_ops(content, threads=2) == [True, True, True, False]
    assert {"LEAKY_RELU", "CONV_2D", "SPACE_TO_DEPTH", "CONCATENATION", "MAX_POOL_2D"} <= GPU_OPS


@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")
def test_int8_ops_get_their_integer_versions():
    model = _tiny()
    images = np.random.default_rng(1).random((4, 16, 16, 3), dtype=np.float32)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(model.input, model.layers[-2].output))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    report = compatibility(converter.convert())
    # int8 kernels are newer versions of the same ops; XNNPACK takes all of them (QS8)
    assert [(o["op"], o["version"], o["xnnpack"]) for o in report["ops"]] == [
        ("QUANTIZE", 1, True), ("CONV_2D", 3, True), ("LEAKY_RELU", 1, True), ("CONV_2D", 3, True),
        ("DEQUANTIZE", 2, True)]
    assert report["warnings"] == []


@pytest.mark.parametrize("from_keras", [True, False])
def test_sparsity_warning_for_80_percent_zeros_only(from_keras):
    sparse, dense = _tiny(zeros=0.8), _tiny()
    sparse_report = compatibility(_convert(sparse), sparse if from_keras else None)
    dense_report = compatibility(_convert(dense), dense if from_keras else None)
    # 8*3*3*3 + 16*8 = 344 weights, 80 % of each kernel zeroed (quantile rounding: 174 + 103 zeros)
    assert sparse_report["zero_fraction"] == pytest.approx((174 + 103) / 344, abs=0.01)
    assert dense_report["zero_fraction"] == 0.0
    sparse_warnings = [w for w in sparse_report["warnings"] if "weights are zero" in w]
    assert len(sparse_warnings) == 1 and "80 % of the weights are zero" in sparse_warnings[0]
    assert "unmet: sparse_storage, ends_mean_or_d2s" in sparse_warnings[0]
    assert not [w for w in dense_report["warnings"] if "weights are zero" in w]
    # the graph starts as XNNPACK's sparse inference wants, and its 1x1 conv is sparse enough
    assert sparse_inference_conditions(_convert(sparse)) == {
        "sparse_storage": False, "starts_3x3_s2_rgb": True, "ends_mean_or_d2s": False, "zeros_1x1": True}
    assert sparse_inference_conditions(_convert(dense))["zeros_1x1"] is False


def test_not_a_flatbuffer():
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        compatibility(b"0123456789")
