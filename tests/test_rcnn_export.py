"""Faster R-CNN to TFLite: the float file equals Keras, the int8 file is integer but for its float
islands (proposals, RoIAlign) and detects what Keras detects; evaluate, detect and export through
the command line, --postprocess refused.

One small model (64 px, width 0.25, K = 32 proposals) with seeded random weights, exported once in
float and once in int8 through ``kprune export`` (the module's fixtures), on the tiny synthetic data.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kprune import detectors
from kprune.cli import main
from kprune.detectors.rcnn import builders
from kprune.models.io import load_model, save_model
from kprune.models.litert import TFLiteRunner, operators

RCNN = detectors.get("rcnn")
CLASSES = ["ellipse", "triangle", "rectangle", "star", "cross"]  # the synthetic data's


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_synth_data):
    """The model saved, then exported by ``kprune export`` in float and in int8 (8 calibration
    images); the reports as printed with --json."""
    from conftest import randomize

    folder = tmp_path_factory.mktemp("rcnn-export")
    model = builders.faster_rcnn_small(input_size=64, classes=5, width=0.25, names=CLASSES, proposals=32,
                                       pre_nms_topk=64)
    randomize(model, seed=5, scale=0.1)
    save_model(model, folder / "m.keras")
    reports = {}
    for quant in ("none", "int8"):
        out = folder / f"m-{quant}.tflite"
        reports[quant] = json.loads(_cli("export", folder / "m.keras", "--quant", quant, "--data", tiny_synth_data,
                                         "--calibration", 8, "--out", out, "--json"))
        # `kprune evaluate M.tflite` finds the .keras of the same name
        save_model(model, folder / f"m-{quant}.keras")
    return {"folder": folder, "model": load_model(folder / "m.keras"), "reports": reports}


def _images(count=4, seed=0):
    return np.random.default_rng(seed).random((count, 64, 64, 3)).astype(np.float32)


def test_float_file_equals_keras(exported):
    """Float32: every output within 1e-4 of Keras, proposals in the same order (the logits of random
    weights have no ties); the export's own check says so too."""
    model = exported["model"]
    content = (exported["folder"] / "m-none.tflite").read_bytes()
    images = _images()
    want = [o.numpy() for o in model(images, training=False)]
    got = TFLiteRunner(content, model)(images)
    for name, w, g in zip(("rpn_logits", "rpn_deltas", "proposals", "class_logits", "box_deltas"), want, got):
        assert np.abs(g - w).max() <= 1e-4, name
    assert (want[2][..., 2] > want[2][..., 0]).sum() > 32  # real proposals, not only padding rows
    check = exported["reports"]["none"]["check"]
    assert check["max_abs_diff"] <= 1e-4 and check["detections"]["unmatched"] == 0


def test_int8_file_is_integer_with_float_islands(exported):
    """The backbone, FPN, RPN 3x3 and box head convs / dense layers int8; the RPN's 1x1 predictors, the proposals' decoding (EXP), the RoIAlign level rule (LOG,
    SQRT) and bilinear sampling (BATCH_MATMUL) float: the islands the family names."""
    model = exported["model"]
    islands = RCNN.int8_float_layers(model)
    assert islands[:2] == ["rpn_objectness_logits", "rpn_anchor_deltas"] and islands[-2:] == ["proposals", "roi_align"]
    assert "rpn_conv" not in islands and len(islands) == 2 + 10 + 2 + 2  # 5 reshapes and a concatenation each
    ops = operators((exported["folder"] / "m-int8.tflite").read_bytes())
    kinds = {}
    for op in ops:
        kinds.setdefault(op["op"], set()).add(op["inputs"][0])
    convs = [op["inputs"][0] for op in ops if op["op"] == "CONV_2D"]
    # 20 backbone, 8 FPN, 5 RPN 3x3 int8; the RPN's two 1x1 predictors on 5 levels float
    assert (convs.count("int8"), convs.count("float32"), len(convs)) == (33, 10, 43)
    assert kinds["FULLY_CONNECTED"] == {"int8"}
    for op in ("EXP", "LOG", "SQRT", "BATCH_MATMUL"):
        assert kinds[op] == {"float32"}, op
    assert "WHILE" in kinds  # the per-image NMS loop (NON_MAX_SUPPRESSION_V4, float only)
    report = exported["reports"]["int8"]
    assert report["quant"] == "int8" and report["bytes"] < exported["reports"]["none"]["bytes"] / 2


def test_int8_file_detects_what_keras_detects(exported):
    """The int8 check compares detections and mAP, not the proposals' order. Raw outputs: the RPN
    outputs and the ROI outputs on the file's own proposals differ from Keras by at most 10 % of
    their largest value. Detections (score >= 0.25, 8 val images): at least 80 % of either side's
    have a same-class partner at IoU >= 0.5; mAP@0.5 within 0.05 of Keras'."""
    check = exported["reports"]["int8"]["check"]
    assert check["on"] == "val images"
    assert check["max_abs_diff"] <= 0.5 * check["max_abs_output"]
    found = check["detections"]
    assert found["min_score"] == 0.25 and found["detections"] >= 10
    assert found["unmatched"] <= 0.2 * (found["detections"] + found["file_detections"])
    scores = check["map50"]
    assert scores["images"] == 8 and abs(scores["file"] - scores["keras"]) <= 0.05


def test_evaluate_and_detect_through_the_cli(exported, tiny_synth_data, tmp_path):
    """``kprune evaluate`` on the .keras and the float .tflite: the same mAP to 1e-6; the int8 file
    within 0.05. ``kprune detect`` on the .keras and the float file run by LiteRT: the same
    detections to 0.01 px."""
    folder = exported["folder"]
    scores = {name: json.loads(_cli("evaluate", folder / name, "--data", tiny_synth_data, "--json"))["map50"]
              for name in ("m.keras", "m-none.tflite", "m-int8.tflite")}
    assert abs(scores["m-none.tflite"] - scores["m.keras"]) <= 1e-6
    assert abs(scores["m-int8.tflite"] - scores["m.keras"]) <= 0.05
    assert scores["m-int8.tflite"] == pytest.approx(exported["reports"]["int8"]["check"]["map50"]["file"])

    from data_tools.synth import generate

    generate(tmp_path / "raw", num_train=1, num_val=2, size=96, seed=3, progress=False)
    images = sorted(str(p) for p in (tmp_path / "raw").rglob("*.jpg"))[:2]
    _cli("detect", folder / "m.keras", *images, "--out", tmp_path / "keras", "--score", 0.2)
    keras_found = json.loads((tmp_path / "keras" / "detections.json").read_text())
    _cli("detect", folder / "m-none.tflite", *images, "--out", tmp_path / "file", "--score", 0.2, "--keras",
         folder / "m.keras")
    file_found = json.loads((tmp_path / "file" / "detections.json").read_text())
    assert len(keras_found) == len(file_found) > 0
    for want, got in zip(keras_found, file_found):
        assert (want["image_id"], want["category_id"]) == (got["image_id"], got["category_id"])
        assert np.abs(np.subtract(want["bbox"], got["bbox"])).max() <= 0.01


def test_qat_is_refused_with_a_reason(exported):
    from kprune.export.qat import quantize_model

    with pytest.raises(ValueError, match=r"quantization-aware training of .*: layer rpn_conv is used 5 times: .*"
                                         r"post-training int8 \(--quant int8\) has no such limit"):
        quantize_model(exported["model"])


def test_postprocess_is_refused(exported, tmp_path):
    result = CliRunner().invoke(main, ["export", str(exported["folder"] / "m.keras"), "--postprocess",
                                       "--out", str(tmp_path / "p.tflite")])
    assert result.exit_code != 0
    assert "cannot export with the TFLite_Detection_PostProcess op" in result.output
    assert "decodes class-specific boxes against its own proposals" in result.output
    assert not (tmp_path / "p.tflite").exists()


def test_outputs_of_equal_shapes_are_told_apart_by_name(tmp_path):
    """With 3 classes the class logits (K, 4) have the proposals' shape: the runner takes the file's
    outputs by the names the converter gives them (the Keras output names), not by shape."""
    from kprune.export.tflite import convert

    model = builders.faster_rcnn_small(input_size=64, classes=3, width=0.25, proposals=16, pre_nms_topk=32)
    assert model.output_shape[2][1:] == model.output_shape[3][1:] == (16, 4)
    images = _images(1, seed=3)
    got = TFLiteRunner(convert(model), model)(images)
    for ours, theirs in zip(got, model(images)):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)
