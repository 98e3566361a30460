"""Saving with safe_mode and TFLite conversion keep the models' outputs."""

import numpy as np
import pytest

from kprune._keras import tf
from kprune.darknet.builder import build_model
from kprune.models.io import load_model, save_model
from kprune.models.layers import detection_heads
from tests.conftest import cfg_path, randomize


@pytest.mark.parametrize("name, reorg", [("yolov2", "darknet"), ("yolov2", "space_to_depth"), ("yolov3-tiny", "darknet")])
def test_keras_save_load_safe_mode(tmp_path, name, reorg):
    model = build_model(cfg_path(name), input_size=64, width=0.125, classes=3, reorg_mode=reorg,
                        names=["a", "b", "c"], darknet_header=[0, 2, 0, 99])
    randomize(model, seed=5)
    path = tmp_path / "m.keras"
    save_model(model, path)
    loaded = load_model(path)
    x = np.random.default_rng(6).random((2, 64, 64, 3)).astype(np.float32)
    for a, b in zip(tf.nest.flatten(model(x)), tf.nest.flatten(loaded(x))):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    head = detection_heads(loaded)[0]
    assert head.names == ["a", "b", "c"] and head.darknet_header == [0, 2, 0, 99]
    if name == "yolov2":
        assert loaded.get_layer("reorg_27").mode == reorg
    assert not list(tmp_path.glob(".tmp-*"))


def test_save_requires_keras_suffix(tmp_path):
    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.125)
    with pytest.raises(ValueError, match="must end in .keras"):
        save_model(model, tmp_path / "m.h5")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "none.keras")


@pytest.mark.parametrize("name", ["yolov2", "yolov3-tiny"])
def test_tflite_matches_keras(name):
    from ai_edge_litert.interpreter import Interpreter

    model = build_model(cfg_path(name), input_size=96, width=0.125, classes=2)
    randomize(model, seed=7, scale=0.05)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    x = np.random.default_rng(8).random((1, 96, 96, 3)).astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    expected = [o.numpy() for o in tf.nest.flatten(model(x))]
    got = {tuple(d["shape"]): interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
    for e in expected:
        diff = np.max(np.abs(got[e.shape] - e))
        assert diff < 1e-4 * max(1.0, np.max(np.abs(e))), diff
