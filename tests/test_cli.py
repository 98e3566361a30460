"""The command-line contract: info --json, darknet convert/export, predict, detect, clear errors."""

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from kprune.cli import main
from kprune.darknet.builder import build_model
from kprune.darknet.weights import WeightsHeader, save_weights
from kprune.models.io import load_model
from tests.conftest import cfg_path, randomize


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def darknet_files(tmp_path_factory):
    """A 96-pixel, 0.125-wide yolov2 with random weights as cfg + .weights."""
    folder = tmp_path_factory.mktemp("darknet")
    text = open(cfg_path("yolov2")).read()
    text = text.replace("width=608", "width=96").replace("height=608", "height=96")
    cfg = folder / "small.cfg"
    cfg.write_text(text)
    model = build_model(cfg, width=0.125)
    randomize(model, seed=9, scale=0.05)
    # the width override is not in the cfg file, so write the filters into it
    lines, index = [], -1
    for line in text.splitlines():
        if line.startswith("["):
            index += 1
        if line.startswith("filters=") and index - 1 not in (30,):
            line = f"filters={model.get_layer(f'conv_{index - 1}').filters}"
        lines.append(line)
    cfg.write_text("\n".join(lines) + "\n")
    weights = folder / "small.weights"
    save_weights(model, weights, WeightsHeader(0, 2, 0, 640))
    return cfg, weights, model


def test_info_json_for_cfg_matches_reference():
    result = _run("info", "--cfg", cfg_path("yolov2-tiny-voc"), "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["params"] == 15_867_885 and info["trainable_params"] == 15_861_773
    assert info["non_trainable_params"] == 6_112
    assert info["flops"] / 1e9 == pytest.approx(6.97, rel=1e-3)
    assert info["input_shape"] == [None, 416, 416, 3] and info["output_shapes"] == [[None, 13, 13, 125]]


def test_info_overrides_and_zoo_name():
    info = json.loads(_run("info", "--cfg", "yolov2", "--size", "416", "--classes", "5", "--json").output)
    # 50,983,561 - head conv (1024 x 425 + 425) + (1024 x 50 + 50) parameters
    assert info["params"] == 50_983_561 - (1024 * 425 + 425) + (1024 * 50 + 50)
    assert info["output_shapes"] == [[None, 13, 13, 50]]


def test_convert_export_round_trip_and_info(tmp_path, darknet_files):
    cfg, weights, model = darknet_files
    out = tmp_path / "m.keras"
    assert _run("darknet", "convert", cfg, weights, out).exit_code == 0
    exported = tmp_path / "again.weights"
    assert _run("darknet", "export", out, exported).exit_code == 0
    assert exported.read_bytes() == weights.read_bytes()
    info = json.loads(_run("info", out, "--json").output)
    assert info["params"] == model.count_params()
    assert info["nonzero_params"] == sum(int(np.count_nonzero(w.numpy())) for w in model.weights)


def test_predict_writes_raw_outputs(tmp_path, darknet_files):
    cfg, weights, model = darknet_files
    out = tmp_path / "m.keras"
    _run("darknet", "convert", cfg, weights, out)
    images = np.random.default_rng(10).random((3, 96, 96, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    result = _run("predict", out, tmp_path / "x.npy", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "y.npz")
    assert list(saved.keys()) == ["output_0"]
    np.testing.assert_allclose(saved["output_0"], model(images).numpy(), atol=1e-5)
    np.save(tmp_path / "one.npy", images[0])
    assert _run("predict", out, tmp_path / "one.npy", tmp_path / "z.npz").exit_code == 0
    assert np.load(tmp_path / "z.npz")["output_0"].shape == (1, 3, 3, 425)


def test_detect_writes_images_and_coco_results(tmp_path, darknet_files):
    cfg, weights, _ = darknet_files
    out = tmp_path / "m.keras"
    _run("darknet", "convert", cfg, weights, out)
    image = (np.random.default_rng(11).random((80, 120, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "street.png"), image)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class{i}" for i in range(80)) + "\n")
    result = _run("detect", out, tmp_path / "street.png", "--out", tmp_path / "det", "--score", "0.001",
                  "--names", names)
    assert result.exit_code == 0, result.output
    detections = json.loads((tmp_path / "det" / "detections.json").read_text())
    assert cv2.imread(str(tmp_path / "det" / "street.jpg")).shape == (80, 120, 3)
    assert 0 < len(detections) <= 100
    for det in detections:
        x, y, w, h = det["bbox"]
        assert det["image_id"] == 0 and det["score"] >= 0.001
        assert 0 <= x and 0 <= y and x + w <= 120.01 and y + h <= 80.01
        assert det["category_name"] == f"class{det['category_id']}"
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    names.write_text("a\nb\n")
    result = CliRunner().invoke(main, ["detect", str(out), str(tmp_path / "street.png"), "--out", str(tmp_path / "d2"),
                                       "--names", str(names)])
    assert result.exit_code == 1 and "2 class names given for a model with 80 classes" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("info",), "give either MODEL.keras or --cfg CFG"),
        (("info", "--cfg", "yolov9"), "'yolov9' is not a zoo model or a cfg file; zoo models: yolov2, "),
        (("info", "--cfg", "yolov2", "--size", "100"), "input size 100 must be a positive multiple of 32"),
        (("info", "missing.keras"), "model file missing.keras does not exist"),
    ],
)
def test_errors_are_one_line_messages(args, message):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code != 0
    assert message in result.output
    assert isinstance(result.exception, SystemExit)  # a handled error, not an exception escaping


def test_bad_weights_and_input_messages(tmp_path, darknet_files):
    cfg, weights, _ = darknet_files
    short = tmp_path / "short.weights"
    short.write_bytes(weights.read_bytes()[:1000])
    result = CliRunner().invoke(main, ["darknet", "convert", str(cfg), str(short), str(tmp_path / "m.keras")])
    assert result.exit_code == 1 and "file ends in layer conv_" in result.output
    assert not (tmp_path / "m.keras").exists()
    result = CliRunner().invoke(main, ["darknet", "convert", str(weights), str(cfg), str(tmp_path / "m.keras")])
    assert result.exit_code == 1 and "is not a text cfg file (cfg and weights swapped?)" in result.output
    result = CliRunner().invoke(main, ["darknet", "convert", str(cfg), str(weights), str(tmp_path / "m.h5")])
    assert result.exit_code == 2 and "m.h5 must end in .keras" in result.output
    out = tmp_path / "ok.keras"
    _run("darknet", "convert", cfg, weights, out)
    np.save(tmp_path / "big.npy", np.full((96, 96, 3), 255.0, np.float32))
    result = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "big.npy"), str(tmp_path / "y.npz")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "values range over [255, 255]; expected [0, 1]" in result.output
    np.save(tmp_path / "wrong.npy", np.zeros((64, 64, 3), np.float32))
    result = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "wrong.npy"), str(tmp_path / "y.npz")])
    assert result.exit_code == 1
    assert "shape (1, 64, 64, 3) does not fit the model" in result.output
    assert not (tmp_path / "y.npz").exists()
    model = load_model(out)
    assert model.get_layer("region_31").darknet_header == [0, 2, 0, 640]


def test_the_scope_help_names_every_scope():
    from kprune.cli import SCOPE_HELP
    from kprune.prune.scope import SCOPES

    assert all(name in SCOPE_HELP.replace(",", " ").split() for name in SCOPES)
