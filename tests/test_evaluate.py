"""mAP on hand-made cases with known AP, agreement with pycocotools, and the consistency of targets,
decoding and evaluation (perfect raw outputs score 1)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kprune.evaluate import (
    ImageDetections,
    ImageTruth,
    coco_detections,
    coco_ground_truth,
    evaluate_detections,
    voc_ap,
)

NAMES = ["a", "b"]


def truth(image_id, boxes, labels, ignore=()):
    ignore = np.asarray(ignore, np.float64).reshape(-1, 4)
    return ImageTruth(image_id, 100, 100, np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels),
                      ignore, np.full(len(ignore), -1))


def dets(image_id, boxes, scores, labels):
    return ImageDetections(image_id, np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64),
                           np.asarray(labels))


BOX = [10, 10, 50, 50]
FAR = [60, 60, 90, 90]


def test_voc_ap_interpolations_by_hand():
    # recall 0.5 at precision 1, then recall 1 at precision 0.5
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # 11-point: t = 0..0.5 -> 1, t = 0.6..1 -> 2/3
    assert voc_ap(recall, precision, eleven_point=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_perfect_detections_score_one():
    result = evaluate_detections([dets(1, [BOX, FAR], [0.9, 0.8], [0, 1])], [truth(1, [BOX, FAR], [0, 1])], NAMES)
    assert (result["map50"], result["map50_11pt"]) == (1.0, 1.0)
    assert result["coco_map"] == pytest.approx(1.0) and result["coco_ap50"] == pytest.approx(1.0)
    assert result["per_class"]["a"]["recall"] == 1.0


def test_a_false_positive_above_the_true_positive_halves_ap():
    result = evaluate_detections([dets(1, [FAR, BOX], [0.9, 0.8], [0, 0])], [truth(1, [BOX], [0])], NAMES)
    a = result["per_class"]["a"]
    assert a["ap"] == pytest.approx(0.5) and a["ap_11pt"] == pytest.approx(0.5)
    assert (a["detections"], a["ground_truth"]) == (2, 1)
    assert result["coco_ap50"] == pytest.approx(0.5, abs=0.01)  # pycocotools' 101-point curve
    assert np.isnan(result["per_class"]["b"]["ap"]) and result["map50"] == pytest.approx(0.5)  # b has no truth


def test_a_missed_object_and_duplicates():
    missed = evaluate_detections([dets(1, [BOX], [0.9], [0])], [truth(1, [BOX, FAR], [0, 0])], NAMES)
    assert missed["per_class"]["a"]["ap"] == pytest.approx(0.5)
    assert missed["per_class"]["a"]["ap_11pt"] == pytest.approx(6 / 11)
    assert missed["per_class"]["a"]["recall"] == 0.5
    # the second detection of the same object is a false positive, after the true one: AP stays 1
    duplicate = evaluate_detections([dets(1, [BOX, [11, 11, 51, 51]], [0.9, 0.8], [0, 0])],
                                    [truth(1, [BOX], [0])], NAMES)
    a = duplicate["per_class"]["a"]
    assert a["ap"] == 1.0 and a["precision"] == 0.5 and a["detections"] == 2
    # a detection whose best-overlapping truth is already taken is a false positive (the devkit's rule)
    first = evaluate_detections([dets(1, [[11, 11, 51, 51], BOX, BOX], [0.9, 0.8, 0.7], [0, 0, 0])],
                                [truth(1, [BOX], [0])], NAMES)
    assert first["per_class"]["a"]["ap"] == 1.0 and first["per_class"]["a"]["precision"] == pytest.approx(1 / 3)


def test_ignore_regions_count_neither_way():
    detections = [dets(1, [FAR, BOX], [0.9, 0.8], [0, 0])]
    plain = evaluate_detections(detections, [truth(1, [BOX], [0])], NAMES)
    ignored = evaluate_detections(detections, [truth(1, [BOX], [0], ignore=[[55, 55, 100, 100]])], NAMES)
    assert plain["map50"] == pytest.approx(0.5) and ignored["map50"] == 1.0
    assert ignored["per_class"]["a"]["detections"] == 1
    assert ignored["coco_ap50"] == pytest.approx(1.0)  # a crowd annotation in pycocotools


def test_agreement_with_pycocotools_on_random_detections():
    rng = np.random.default_rng(0)
    truths, detections = [], []
    for image_id in range(20):
        corners = rng.uniform(0, 70, (4, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(10, 30, (4, 2))], axis=1)
        labels = rng.integers(0, 2, 4)
        truths.append(truth(image_id, boxes, labels))
        noisy = boxes + rng.normal(0, 3, boxes.shape)
        extra = np.concatenate([corners[:2], corners[:2] + 15], axis=1)
        detections.append(dets(image_id, np.concatenate([noisy, extra]), rng.uniform(0.01, 1, 6),
                               np.concatenate([labels, rng.integers(0, 2, 2)])))
    result = evaluate_detections(detections, truths, NAMES)
    # VOC all-point AP50 and pycocotools' 101-point AP50 differ only by the interpolation
    assert result["coco_ap50"] == pytest.approx(result["map50"], abs=0.02)
    assert 0.3 < result["map50"] < 1.0


def test_cli_scores_coco_files(tmp_path):
    from kprune.cli import main

    truths = [truth(1, [BOX, FAR], [0, 1]), truth(2, [BOX], [1])]
    detections = [dets(1, [BOX, FAR], [0.9, 0.8], [0, 1]), dets(2, [FAR, BOX], [0.95, 0.5], [1, 1])]
    (tmp_path / "gt.json").write_text(json.dumps(coco_ground_truth(truths, NAMES)))
    (tmp_path / "dt.json").write_text(json.dumps(coco_detections(detections)))
    result = CliRunner().invoke(main, ["evaluate", "--detections", str(tmp_path / "dt.json"),
                                       "--ground-truth", str(tmp_path / "gt.json"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    direct = evaluate_detections(detections, truths, NAMES)
    for key in ("map50", "map50_11pt", "coco_map", "coco_ap50"):
        assert payload[key] == pytest.approx(direct[key])
    # b: FP (0.95) then TP (0.8) then TP (0.5): precision 0, 1/2, 2/3 at recall 0, 1/2, 1; made
    # monotone from the right, 2/3 over the whole recall range
    assert payload["per_class"]["b"]["ap"] == pytest.approx(2 / 3)
    # standard COCO category ids (1, 18, ...) map to class indices in id order; low scores are cut
    renumber = {0: 7, 1: 3}  # a -> id 7, b -> id 3
    gt = coco_ground_truth(truths, NAMES)
    for thing in gt["annotations"]:
        thing["category_id"] = renumber[thing["category_id"]]
    for thing in gt["categories"]:
        thing["id"] = renumber[thing["id"]]
    (tmp_path / "gt2.json").write_text(json.dumps(gt))
    results = [dict(r, category_id=renumber[r["category_id"]]) for r in coco_detections(detections)]
    results.append({"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "score": 0.0005})
    (tmp_path / "dt2.json").write_text(json.dumps(results))
    renamed = CliRunner().invoke(main, ["evaluate", "--detections", str(tmp_path / "dt2.json"),
                                        "--ground-truth", str(tmp_path / "gt2.json"), "--json"])
    again = json.loads(renamed.output)
    assert list(again["per_class"]) == ["b", "a"]  # id 3 (b) before id 7 (a)
    assert again["map50"] == pytest.approx(payload["map50"]) and again["per_class"]["b"]["detections"] == 3
    bad = CliRunner().invoke(main, ["evaluate", "--detections", str(tmp_path / "gt.json"),
                                    "--ground-truth", str(tmp_path / "gt.json")])
    assert bad.exit_code == 1 and "expected a list of COCO results" in bad.output
    table = CliRunner().invoke(main, ["evaluate", "--detections", str(tmp_path / "dt.json"),
                                      "--ground-truth", str(tmp_path / "gt.json")])
    assert "mAP@0.5 (VOC all-point)" in table.output and table.output.count("\n") >= 5


def test_targets_decoding_and_evaluation_agree_perfect_outputs_score_one(tmp_path):
    """Raw outputs made from the pipeline's own targets must decode to the true boxes: mAP 1."""
    from data_tools import coco, synth
    from data_tools.convert import write_dataset
    from kprune._keras import tf
    from kprune.data.pipeline import make_dataset
    from kprune.detectors.yolo.targets import TargetEncoder
    from kprune.darknet.builder import build_model
    from kprune.evaluate import predict_dataset
    from conftest import cfg_path

    synth.generate(tmp_path / "raw", num_train=2, num_val=12, size=256, seed=3, progress=False)
    records, names, _ = coco.coco_records(tmp_path / "raw", 2017, None)
    write_dataset(records, names, tmp_path / "data", {"kind": "coco"}, {}, progress=False)
    model = build_model(cfg_path("yolov2-voc"), input_size=256, classes=5, width=0.125)
    encoder = TargetEncoder.from_model(model)
    head = model.output_names[0]

    def perfect(targets):
        mask, matching = targets[head]["mask"], targets[head]["matching"]
        offset = tf.clip_by_value(matching[..., 0:2], 1e-5, 1 - 1e-5)
        raw = tf.concat([tf.math.log(offset / (1 - offset)), matching[..., 2:4], tf.where(mask > 0, 12.0, -12.0),
                         tf.one_hot(tf.cast(matching[..., 4], tf.int32), 5) * 30.0], -1)
        return tf.reshape(raw, tf.concat([tf.shape(raw)[:3], [-1]], 0))

    outputs = iter([perfect(t) for _, t in make_dataset(tmp_path / "data", "val", 256, 4, encoder=encoder)])
    detections, truths = predict_dataset(model, tmp_path / "data", "val", 4, predict=lambda images: next(outputs))
    result = evaluate_detections(detections, truths, names)
    # every decoded box is a true one (no false positive in any class) ...
    assert all(row["precision"] == 1.0 for row in result["per_class"].values())
    # ... and only objects that share a cell and anchor with another (YAD2K keeps one target) or that
    # NMS merges with an overlapping one of their class are missed
    assert result["map50"] >= 0.95 and result["coco_map"] >= 0.9


def test_a_tflite_model_is_evaluated_through_litert_like_its_keras_model(tmp_path):
    from data_tools import coco, synth
    from data_tools.convert import write_dataset
    from kprune._keras import tf
    from kprune.evaluate import evaluate_model, tflite_predict
    from kprune import detectors
    from kprune.models.io import save_model
    from conftest import randomize

    synth.generate(tmp_path / "raw", num_train=1, num_val=4, size=96, seed=2, progress=False)
    records, names, _ = coco.coco_records(tmp_path / "raw", 2017, None)
    write_dataset(records, names, tmp_path / "data", {"kind": "coco"}, {}, progress=False)
    model = detectors.build("yolov3-tiny", input_size=96, width=0.125, classes=5)
    randomize(model, seed=3, scale=0.05)
    save_model(model, tmp_path / "m.keras")
    (tmp_path / "m.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    images = np.random.default_rng(1).random((3, 96, 96, 3)).astype(np.float32)
    predict, detect, notes = tflite_predict(str(tmp_path / "m.tflite"), model)
    assert detect is None and notes == []
    got = predict(images)
    for a, b in zip(got, model(images)):
        assert np.abs(a - b.numpy()).max() < 1e-4 * max(1.0, np.abs(b.numpy()).max())
    keras_result = evaluate_model(str(tmp_path / "m.keras"), tmp_path / "data")
    tflite_result = evaluate_model(str(tmp_path / "m.tflite"), tmp_path / "data")
    assert tflite_result["map50"] == pytest.approx(keras_result["map50"], abs=1e-3)
    for name, row in keras_result["per_class"].items():  # a score at the 0.001 cut may fall either way
        assert abs(tflite_result["per_class"][name]["detections"] - row["detections"]) <= 1
    with pytest.raises(ValueError, match="needs the .keras model it was converted from"):
        evaluate_model(str(tmp_path / "m.tflite"), tmp_path / "data", keras_path=str(tmp_path / "x.keras"))


def test_metrics_import_without_tensorflow():
    """Scoring detection files needs no TensorFlow: kprune.evaluate imports it only to run models."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, kprune.evaluate; print(sorted(m for m in ('tensorflow', 'tf_keras') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"
