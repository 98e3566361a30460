"""Phone-ready TFLite: decoding and NMS inside the file through TFLite_Detection_PostProcess give
the detections of ``kprune detect``."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import randomize
from kprune import detectors
from kprune.cli import main
from kprune.detectors.inference import detect
from kprune.data.tfrecord import read_manifest
from kprune.export.command import export
from kprune.export.metadata import WRITER_PACKAGE, read_labels
from kprune.export.postprocess import PostprocessOptions, compare_detections
from kprune.export.tflite import convert
from kprune.detectors import family_of
from kprune.models.head import non_max_suppression, preprocess_image
from kprune.models.io import save_model
from kprune.models.litert import DETECTION_OP, DetectionRunner, TFLiteRunner, detection_op_options, operators

OPTIONS = PostprocessOptions(score_threshold=0.001, iou_threshold=0.45, max_detections=30)


def _model(name, size, **kwargs):
    model = detectors.build(name, input_size=size, classes=3, names=["a", "b", "c"], **kwargs)
    randomize(model, seed=4, scale=0.05)
    return model


@pytest.fixture(scope="module")
def yolov2():
    model = _model("yolov2", 96, width=0.125)
    return model, convert(model, postprocess=OPTIONS)


@pytest.mark.parametrize("name, size, width", [("yolov3-tiny", 96, 0.125), ("ssd300-vgg16", 258, 0.125)])
def test_post_processed_file_gives_the_detections_of_kprune_detect(name, size, width):
    model = _model(name, size, width=width)
    content = convert(model, postprocess=OPTIONS)
    if name.startswith("ssd"):  # the op decodes SSD's offsets with the inverse variances as scales
        options = detection_op_options(content)
        assert [options[k] for k in ("y_scale", "x_scale", "h_scale", "w_scale")] == pytest.approx([10, 10, 5, 5])
    runner = DetectionRunner(content)
    images = np.random.default_rng(5).random((3, size, size, 3)).astype(np.float32)
    check = compare_detections(runner, model, images, OPTIONS)
    # 30 per image: random weights score thousands of boxes above 0.001
    assert check["detections"] == check["file_detections"] == 90 and check["unmatched"] == 0
    assert check["max_box_diff"] < 1e-3 and check["max_score_diff"] < 1e-3, check


def test_yolov2_region_head_and_the_op_settings(yolov2):
    model, content = yolov2
    ops = [op["op"] for op in operators(content)]
    assert ops[-1] == DETECTION_OP and ops.count(DETECTION_OP) == 1 and "REORG" not in ops
    options = detection_op_options(content)
    assert options["max_detections"] == 30 and options["num_classes"] == 3 and options["use_regular_nms"]
    assert options["nms_score_threshold"] == pytest.approx(0.001) and options["nms_iou_threshold"] == pytest.approx(0.45)
    assert [options[k] for k in ("y_scale", "x_scale", "h_scale", "w_scale")] == [1.0, 1.0, 1.0, 1.0]
    runner = DetectionRunner(content)
    assert [tuple(d["shape"]) for d in runner.outputs] == [(1, 30, 4), (1, 30), (1, 30), (1,)]
    images = np.random.default_rng(6).random((2, 96, 96, 3)).astype(np.float32)
    check = compare_detections(runner, model, images, OPTIONS)
    assert check["file_detections"] == 60 and check["unmatched"] == 0
    assert check["max_box_diff"] < 1e-3 and check["max_score_diff"] < 1e-3, check


def test_detect_on_image_pixels_matches(yolov2):
    """``kprune detect`` letterboxes an image of any size and maps boxes back to its pixels; the
    file's boxes, mapped back the same way, agree with it to 1e-3 of the image size."""
    model, content = yolov2
    image = (np.random.default_rng(7).random((80, 120, 3)) * 255).astype(np.uint8)
    (want,) = detect(model, [image], score_threshold=0.02, iou_threshold=0.45, max_detections=30)
    batch, transform = preprocess_image(image, (96, 96), True)
    ((boxes, scores, classes),) = DetectionRunner(content)(batch[None])
    keep = scores >= 0.02
    boxes, scores, classes = transform.to_image(boxes[keep]), scores[keep], classes[keep]
    assert len(want) == len(boxes) > 0
    order = np.lexsort((boxes[:, 0], -np.round(scores, 5)))
    want = sorted(want, key=lambda d: (-round(d.score, 5), d.box[0]))
    np.testing.assert_allclose([d.box for d in want], boxes[order], atol=1e-3 * 120)
    np.testing.assert_allclose([d.score for d in want], scores[order], atol=1e-3)
    assert [d.class_id for d in want] == classes[order].tolist()


def test_export_and_evaluate_a_post_processed_file(tmp_path, tiny_synth_data):
    from kprune.evaluate import evaluate_model

    model = _model("yolov3-tiny", 64, width=0.125)
    names = read_manifest(tiny_synth_data).classes
    model = detectors.family_of(model).replace_classes(model, len(names), names)
    randomize(model, seed=8, scale=0.05)
    save_model(model, tmp_path / "m.keras")
    report = export(model, str(tmp_path / "m.tflite"), data=tiny_synth_data, postprocess=PostprocessOptions())
    assert report["check"]["unmatched"] == 0 and report["check"]["max_box_diff"] < 1e-3
    assert report["postprocess"] == {"score_threshold": 0.001, "iou_threshold": 0.45, "max_detections": 100}
    # the labels and normalisation in the file itself (MediaPipe's writer), and the file still runs
    assert report["tflite_metadata"].startswith("labels, input normalisation")
    content = (tmp_path / "m.tflite").read_bytes()
    assert read_labels(content) == list(names) and len(names) == 5
    assert b"TFLITE_METADATA" in content and DetectionRunner(content).input_size == (64, 64)
    metadata = json.loads((tmp_path / "m.json").read_text())
    assert metadata["postprocess"]["op"] == DETECTION_OP and "anchors" not in json.dumps(metadata)
    assert list(metadata["outputs"]) == ["detection_boxes", "detection_classes", "detection_scores", "num_detections"]
    keras = evaluate_model(str(tmp_path / "m.keras"), tiny_synth_data)
    tflite = evaluate_model(str(tmp_path / "m.tflite"), tiny_synth_data)
    assert "notes" not in tflite
    assert [r["detections"] for r in tflite["per_class"].values()] == [r["detections"] for r in keras["per_class"].values()]
    assert abs(tflite["map50"] - keras["map50"]) < 1e-4 and abs(tflite["coco_map"] - keras["coco_map"]) < 1e-4
    # kprune detect runs the file (its own NMS) and finds what it finds with the .keras model
    from data_tools.synth import generate

    generate(tmp_path / "raw", num_train=1, num_val=2, size=96, seed=3, progress=False)
    images = sorted(str(p) for p in (tmp_path / "raw").rglob("*.jpg"))[:2]
    found = {}
    for name in ("m.keras", "m.tflite"):
        result = CliRunner().invoke(main, ["detect", str(tmp_path / name), *images, "--out", str(tmp_path / name[2:]),
                                           "--score", "0.01"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        found[name] = json.loads((tmp_path / name[2:] / "detections.json").read_text())
    assert "own post-processing: NMS at IoU 0.45, at most 100 detections" in result.output
    assert len(found["m.keras"]) == len(found["m.tflite"]) > 0
    for want, got in zip(found["m.keras"], found["m.tflite"]):
        assert (want["image_id"], want["category_id"]) == (got["image_id"], got["category_id"])
        assert np.abs(np.subtract(want["bbox"], got["bbox"])).max() <= 0.01
    # settings that cut detections are said
    export(model, str(tmp_path / "cut.tflite"), postprocess=PostprocessOptions(0.3, 0.45, 10))
    (tmp_path / "cut.keras").write_bytes((tmp_path / "m.keras").read_bytes())
    notes = evaluate_model(str(tmp_path / "cut.tflite"), tiny_synth_data)["notes"]
    assert len(notes) == 2 and "score threshold 0.3" in notes[0] and "at most 10 detections" in notes[1]


def test_bad_options_and_files(tmp_path, yolov2):
    model, content = yolov2
    for kwargs, message in (({"score_threshold": 1.5}, "score threshold 1.5"), ({"iou_threshold": 0.0}, "refuses 0"),
                            ({"max_detections": 0}, "max detections 0")):
        with pytest.raises(ValueError, match=message):
            PostprocessOptions(**kwargs)
    with pytest.raises(ValueError, match="apply to TFLite"):
        export(model, str(tmp_path / "saved"), format="saved_model", postprocess=OPTIONS)
    raw = convert(model)
    assert detection_op_options(raw) is None
    with pytest.raises(ValueError, match="export it with --postprocess"):
        DetectionRunner(raw)
    with pytest.raises(ValueError, match="do not match"):
        TFLiteRunner(content, model)


def test_cli_export_postprocess(tmp_path, yolov2):
    model, _ = yolov2
    save_model(model, tmp_path / "m.keras")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "m.keras"), "--postprocess", "--max-detections", "20",
                                       "--out", str(tmp_path / "m.tflite")])
    assert result.exit_code == 0, result.output
    assert "post-processed" in result.output and "0 unmatched" in result.output
    assert detection_op_options((tmp_path / "m.tflite").read_bytes())["max_detections"] == 20
    result = CliRunner().invoke(main, ["export", str(tmp_path / "m.keras"), "--nms-iou", "0.5",
                                       "--out", str(tmp_path / "n.tflite")])
    assert result.exit_code != 0 and "apply with --postprocess" in result.output


def test_int8_keeps_the_decoding_float():
    """int8: the network is integer up to its heads, the decoding before the op float, so the file
    gives what the plain int8 file's outputs give when decoded in float."""
    model = _model("yolov3-tiny", 96, width=0.125)
    rng = np.random.default_rng(9)
    calibration = rng.random((8, 96, 96, 3)).astype(np.float32)
    content = convert(model, "int8", calibration, postprocess=OPTIONS)
    ops = operators(content)
    names = [op["op"] for op in ops]
    # float in at the input, out after each of the two heads
    assert names.count("QUANTIZE") == 1 and names.count("DEQUANTIZE") == 2 and names[-1] == DETECTION_OP
    assert {op["inputs"][0] for op in ops if op["op"] in ("CONV_2D", "LEAKY_RELU", "MAX_POOL_2D")} == {"int8"}
    decoding = {op["op"] for op in ops if op["inputs"][0] == "float32"}
    assert decoding == {"QUANTIZE", "RESHAPE", "STRIDED_SLICE", "LOGISTIC", "ADD", "MUL", "CONCATENATION", DETECTION_OP}
    with pytest.raises(ValueError, match="keeps float io"):
        convert(model, "int8", calibration, io="uint8", postprocess=OPTIONS)
    plain = TFLiteRunner(convert(model, "int8", calibration), model)
    images = rng.random((2, 96, 96, 3)).astype(np.float32)
    runner = DetectionRunner(content)
    check = compare_detections(runner, model, images, OPTIONS, predict=plain)
    assert check["file_detections"] == check["detections"] == 60
    assert check["max_box_diff"] < 1e-6 and check["max_score_diff"] < 1e-6, check
    # int8 scores tie a lot (here 10 values among 30 detections) and the two NMS break ties in
    # their own order, so boxes of equal score may differ; the scores kept are the same
    want = non_max_suppression(*family_of(model).decode(model, plain(images)), 0.001, 0.45, 30)
    for (_, scores, _), (_, want_scores, _) in zip(runner(images), want):
        np.testing.assert_allclose(np.sort(scores), np.sort(want_scores), atol=1e-6)


def test_the_makefile_installs_the_metadata_writer():
    from conftest import REPO

    assert f"pip install --quiet --no-deps {WRITER_PACKAGE}" in (REPO / "Makefile").read_text()
