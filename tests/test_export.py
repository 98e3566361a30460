"""Saving with safe_mode and TFLite conversion keep the models' outputs."""

import numpy as np
import pytest

from kprune._keras import tf
from kprune.darknet.builder import build_model
from kprune.evaluate import evaluate_loaded
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


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tiny.keras"
    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=2, scale=0.05)
    save_model(model, path)
    return path


def _export(*args):
    from click.testing import CliRunner

    from kprune.cli import main

    return CliRunner().invoke(main, ["export", *[str(a) for a in args]])


def test_export_modes_against_keras(tiny_keras, tiny_synth_data, tmp_path):
    import json

    reports = {}
    for quant in ("none", "fp16", "dynamic", "int8"):
        out = tmp_path / f"{quant}.tflite"
        result = _export(tiny_keras, "--quant", quant, "--data", tiny_synth_data, "--out", out, "--json")
        assert result.exit_code == 0, result.output
        reports[quant] = report = json.loads(result.output)
        assert report["bytes"] == out.stat().st_size and report["check"]["images"] == 8
        assert report["check"]["on"] == "val images"
    scale = reports["none"]["check"]["max_abs_output"]
    assert reports["none"]["check"]["max_abs_diff"] < 1e-5 * scale
    assert reports["fp16"]["check"]["max_abs_diff"] < 2e-3 * scale
    # 8-bit weights (and activations): within a few quantization steps of the output range
    assert reports["dynamic"]["check"]["max_abs_diff"] < 0.05 * scale
    assert reports["int8"]["check"]["max_abs_diff"] < 0.1 * scale and reports["int8"]["calibration_images"] == 16
    # float32 weights, then 2 bytes, then 1 byte per weight (the flatbuffer adds a little)
    assert reports["fp16"]["bytes"] == pytest.approx(reports["none"]["bytes"] / 2, rel=0.1)
    assert reports["int8"]["bytes"] == pytest.approx(reports["none"]["bytes"] / 4, rel=0.2)
    import json

    metadata = json.loads(open(reports["int8"]["metadata_file"]).read())
    assert metadata["heads"][0]["classes"] == 5 and len(metadata["heads"][0]["anchors"]) == 5
    assert metadata["heads"][0]["anchor_units"] == "grid cells" and metadata["boxes_per_image"] == 2 * 2 * 5


def test_int8_with_integer_io(tiny_keras, tiny_synth_data, tmp_path):
    import json

    from kprune.evaluate import evaluate_model

    out = tmp_path / "u8.tflite"
    result = _export(tiny_keras, "--quant", "int8", "--io", "uint8", "--data", tiny_synth_data, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # calibration images span [0, 1]: one uint8 step is 1/255 with zero point 0
    assert report["io_quantization"]["input"] == {"dtype": "uint8", "scale": pytest.approx(1 / 255), "zero_point": 0}
    assert report["io_quantization"]["output_0"]["dtype"] == "uint8"
    from kprune.export.command import summary

    lines = summary(report).splitlines()
    w, h = json.loads(open(report["metadata_file"]).read())["heads"][0]["anchors"][0]
    assert lines[2].startswith(f"region head: 5 classes, anchors (w x h, grid cells) {w:g}x{h:g}, ")
    assert lines[3] == "input: uint8, real = (q - 0) * 0.00392157"
    scores = evaluate_model(str(out), tiny_synth_data, keras_path=str(tiny_keras))
    # the uint8 file scores as the Keras model it came from, to a few points (int8 rounding)
    keras_map = evaluate_loaded(load_model(str(tiny_keras)), tiny_synth_data)["map50"]
    assert scores["map50"] == pytest.approx(keras_map, abs=0.05) and scores["model"] == str(out)


def test_sparse_tflite_is_smaller(tmp_path):
    from kprune.export.tflite import convert

    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    rng = np.random.default_rng(0)
    weights = []
    for w in model.get_weights():
        if w.ndim == 4:
            w = rng.normal(0, 0.05, w.shape).astype(np.float32)
            w[np.abs(w) < np.quantile(np.abs(w), 0.8)] = 0  # 80 % zeros
        weights.append(w)
    model.set_weights(weights)
    dense, sparse = convert(model), convert(model, sparse=True)
    assert len(sparse) < 0.45 * len(dense)


def test_saved_model_export(tiny_keras, tmp_path):
    import json

    out = tmp_path / "sm"
    for _ in range(2):  # the second export replaces the first
        result = _export(tiny_keras, "--format", "saved_model", "--out", out, "--json")
        assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["check"]["max_abs_diff"] < 1e-5 and report["check"]["on"] == "random images"
    assert (out / "saved_model.pb").is_file() and not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_export_errors_are_one_line(tiny_keras, tmp_path):
    cases = [
        (["--quant", "int8", "--out", tmp_path / "a.tflite"], "give --data"),
        (["--out", tmp_path / "a.bin"], "must end in .tflite"),
        (["--format", "saved_model", "--quant", "fp16", "--out", tmp_path / "s"], "apply to TFLite"),
        (["--quant", "fp16", "--io", "int8", "--out", tmp_path / "a.tflite"], "needs full-integer"),
    ]
    for args, message in cases:
        result = _export(tiny_keras, *args)
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert not list(tmp_path.iterdir())


def test_export_in_memory_and_the_file_adapter(tiny_keras, tmp_path):
    import json

    from kprune.export.command import export, export_model

    model = load_model(tiny_keras)
    in_memory = export(model, str(tmp_path / "m.tflite"))
    from_file = export_model(str(tiny_keras), str(tmp_path / "f.tflite"))
    # the adapter's report: the file's path first and its size after out, as kprune export printed it
    assert list(from_file) == ["model", "format", "quant", "io", "sparse", "out", "keras_bytes", "family",
                               "description", "check", "io_quantization", "metadata_file", "bytes", "compatibility"]
    assert from_file["model"] == str(tiny_keras) and from_file["keras_bytes"] == tiny_keras.stat().st_size
    assert list(in_memory) == [k for k in from_file if k not in ("model", "keras_bytes")]
    assert {k: v for k, v in from_file.items() if k not in ("model", "keras_bytes", "out", "metadata_file")} == {
        k: v for k, v in in_memory.items() if k not in ("out", "metadata_file")}
    assert in_memory["metadata_file"] == str(tmp_path / "m.json") and in_memory["bytes"] == (tmp_path / "m.tflite").stat().st_size
    # the same model converts to the same bytes, with the same metadata beside it
    assert (tmp_path / "m.tflite").read_bytes() == (tmp_path / "f.tflite").read_bytes()
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((tmp_path / "f.json").read_text())
    with pytest.raises(ValueError, match="give --data"):
        export(model, str(tmp_path / "q.tflite"), quant="int8")
    assert not (tmp_path / "q.tflite").exists()
