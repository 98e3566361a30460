"""The per-layer TFLite profile: single-layer models, their ops and XNNPACK verdicts, the table."""

import numpy as np
import pytest

from kprune._keras import keras
from kprune.report.profile import interpreter, layer_models, profile_layers, type_table


def _model():
    inputs = keras.Input((16, 16, 3), batch_size=1)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.LeakyReLU(0.1, name="leaky")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    y = keras.layers.Conv2D(4, 1, name="conv2")(x)
    model = keras.Model(inputs, keras.layers.Concatenate(name="concat")([x, y]))
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.normal(0, 0.1, weight.shape).astype(np.float32) + ("variance" in weight.name))
    return model


def test_layer_models_are_the_layers_alone():
    model = _model()
    singles = layer_models(model)
    assert list(singles) == ["conv", "leaky", "pool", "conv2", "concat"]  # batch norm folds into the conv
    x = np.random.default_rng(1).random((1, 16, 16, 3), dtype=np.float32)
    # the conv without bias became a conv with a zero bias: the same outputs
    expected = model.get_layer("conv")(x).numpy()
    np.testing.assert_allclose(singles["conv"](x).numpy(), expected, atol=1e-6)
    assert [tuple(t.shape) for t in singles["concat"].inputs] == [(1, 8, 8, 8), (1, 8, 8, 4)]


def test_profile_of_each_layer_float_and_int8():
    profile = profile_layers(_model(), threads=(1,), runs=2)
    layers = {e["name"]: e for e in profile["layers"]}
    assert layers["conv"]["flops"] == 2 * 16 * 16 * 8 * 3 * 3 * 3  # a multiply-add counts 2
    assert layers["conv"]["ops"] == {"float": [{"op": "CONV_2D", "xnnpack": True}],
                                     "int8": [{"op": "CONV_2D", "xnnpack": True}]}  # int8 io: no (de)quantize ops
    assert layers["leaky"]["ops"]["int8"] == [{"op": "LEAKY_RELU", "xnnpack": True}]
    assert layers["concat"]["ops"]["int8"] == [{"op": "CONCATENATION", "xnnpack": True}]
    assert set(layers["pool"]["ms"]) == {"float_xnnpack_1t", "float_builtin_1t", "int8_xnnpack_1t", "int8_builtin_1t"}
    assert all(ms > 0 for e in profile["layers"] for ms in e["ms"].values())
    by_type = profile["by_type"]
    assert {kind: group["count"] for kind, group in by_type.items()} == {
        "Conv2D": 2, "LeakyReLU": 1, "MaxPooling2D": 1, "Concatenate": 1}
    assert by_type["Conv2D"]["int8_xnnpack_1t"] == pytest.approx(
        layers["conv"]["ms"]["int8_xnnpack_1t"] + layers["conv2"]["ms"]["int8_xnnpack_1t"])
    lines = type_table(profile, threads=(1,)).splitlines()
    assert len(lines) == 2 + 4 and lines[2].startswith("| Conv2D (CONV_2D) | 2 |") and lines[2].endswith("| yes / yes |")


def test_interpreter_runtimes():
    with pytest.raises(ValueError, match="runtime 'gpu': choose one of xnnpack, builtin"):
        interpreter(b"", 1, "gpu")
