"""Dimension clusters: box shapes from the records, IoU k-means, anchors written in each head's units."""

import json

import cv2
import numpy as np
import pytest

from conftest import cfg_path
from data_tools.convert import Record, write_dataset
from kprune.data.anchors import box_sizes, format_anchors, kmeans_anchors, mean_best_iou, shape_iou
from kprune.detectors.yolo.anchors import fit_anchors
from kprune.darknet.builder import build_model
from kprune.models.layers import detection_heads
from kprune.train import TrainConfig, TrainingRun

# (image h, w, box x0, y0, x1, y1 in pixels); letterboxed, six distinct shapes
BOXES = [(100, 200, (0, 0, 20, 20)), (200, 100, (10, 10, 30, 30)), (100, 200, (0, 0, 80, 40)),
         (200, 200, (50, 50, 130, 90)), (200, 200, (0, 0, 60, 60)), (200, 200, (0, 0, 100, 160)),
         (200, 200, (0, 0, 180, 100)), (200, 200, (0, 0, 40, 120))]
LETTERBOXED = [[0.1, 0.1], [0.1, 0.1], [0.4, 0.2], [0.4, 0.2], [0.3, 0.3], [0.5, 0.8], [0.9, 0.5], [0.2, 0.6]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("anchors")
    records = []
    for i, (h, w, box) in enumerate(BOXES):
        path = root / f"{i}.png"
        cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))
        records.append(Record(path, path.name, str(i), [(box, 0)]))
    write_dataset({"train": records, "val": records[:1]}, ["a"], root / "data", {"kind": "test"}, {}, progress=False)
    return root / "data"


def test_box_sizes_are_fractions_of_the_longer_side_or_of_each_side(dataset):
    np.testing.assert_allclose(box_sizes(dataset), LETTERBOXED, atol=1e-6)
    stretched = box_sizes(dataset, letterbox=False)
    np.testing.assert_allclose(stretched[:4], [[0.1, 0.2], [0.2, 0.1], [0.4, 0.4], [0.4, 0.2]], atol=1e-6)


def test_shape_iou_by_hand():
    # (0.1 x 0.2) against (0.1 x 0.1): overlap 0.01, union 0.02; against (0.2 x 0.1): 0.01 / 0.03
    np.testing.assert_allclose(shape_iou([[0.1, 0.2]], [[0.1, 0.1], [0.2, 0.1]]), [[0.5, 1 / 3]])
    assert mean_best_iou([[0.1, 0.2], [0.2, 0.1]], [[0.1, 0.1]]) == pytest.approx(0.5)


def test_kmeans_finds_the_two_clusters_and_their_medians():
    sizes = np.array([[0.1, 0.1], [0.1, 0.1], [0.1, 0.2], [0.4, 0.2], [0.4, 0.2], [0.5, 0.2]])
    anchors, score = kmeans_anchors(sizes, 2, seed=3)
    np.testing.assert_allclose(anchors, [[0.1, 0.1], [0.4, 0.2]])  # medians, smallest first
    # 1, 1, 0.5 (0.1x0.2 vs 0.1x0.1), 1, 1, 0.8 (0.5x0.2 vs 0.4x0.2)
    assert score == pytest.approx((4 + 0.5 + 0.8) / 6)
    with pytest.raises(ValueError, match="3 anchors from 2 distinct"):
        kmeans_anchors([[0.1, 0.1], [0.2, 0.2]], 3)


def test_fit_anchors_writes_grid_cells_for_yolov2_and_pixels_for_yolov3(dataset):
    # yolov3-tiny has 6 anchors, the data 6 distinct shapes: the anchors are those shapes in pixels
    yolo = build_model(cfg_path("yolov3-tiny"), input_size=320, width=0.25)
    fitted = fit_anchors(yolo, dataset)
    expected = [[32, 32], [128, 64], [96, 96], [64, 192], [160, 256], [288, 160]]  # by area
    for head in detection_heads(yolo):
        np.testing.assert_allclose(head.anchors, expected, atol=1e-3)
    assert fitted["mean_iou"] == pytest.approx(1.0)
    assert [head.mask for head in detection_heads(yolo)] == [[3, 4, 5], [0, 1, 2]]  # the masks are kept

    # yolov2-tiny at 320: a 10 x 10 grid, so anchors are fractions x 10
    region = build_model(cfg_path("yolov2-tiny"), input_size=320, width=0.25)
    before = np.asarray(detection_heads(region)[0].anchors) / 10
    fitted = fit_anchors(region, dataset)
    fractions, score = kmeans_anchors(box_sizes(dataset), 5)
    np.testing.assert_allclose(detection_heads(region)[0].anchors, fractions * 10, atol=1e-3)
    assert fitted["mean_iou"] == pytest.approx(score)
    assert fitted["mean_iou_before"] == pytest.approx(mean_best_iou(np.array(LETTERBOXED), before), abs=1e-6)
    assert fitted["mean_iou"] > fitted["mean_iou_before"]
    assert format_anchors([[1.5, 2], [3, 4.25]]) == "1.5,2,  3,4.25"


def test_training_config_checks_anchors(dataset, tmp_path):
    with pytest.raises(ValueError, match="expected kmeans or a list"):
        TrainConfig(anchors="k-means")
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(anchors=[[1, 2], [3]])
    with pytest.raises(ValueError, match="only for a head trained from scratch"):
        TrainConfig(init="model.keras", anchors="kmeans")
    TrainConfig(init="model.keras", mode="new-head", anchors="kmeans")  # a new head may have new anchors
    config = TrainConfig(dataset=str(dataset), model="yolov2-tiny", width=0.25, input_size=64, batch_size=2,
                         anchors=[[1, 1], [2, 2]], out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="2 pairs given, but head .* has 5 anchors"):
        TrainingRun(config, progress=False)
    config.anchors = [[k, k] for k in (0.5, 1, 1.5, 2, 2.5)]
    run = TrainingRun(config, progress=False)
    assert detection_heads(run.detector)[0].anchors == config.anchors
    np.testing.assert_allclose(run.encoder.anchors_px, np.array(config.anchors) * 32)  # one cell = 32 px


def test_anchors_command_prints_a_cfg_line(dataset):
    from click.testing import CliRunner

    from kprune.cli import main

    args = ["anchors", "--data", str(dataset), "--model", cfg_path("yolov3-tiny"), "--size", "320"]
    text = CliRunner().invoke(main, args, catch_exceptions=False).output
    assert text.splitlines()[0] == "anchors = 32,32,  128,64,  96,96,  64,192,  160,256,  288,160"
    assert "1.000 with these" in text
    fitted = json.loads(CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False).output)
    assert fitted["mean_iou"] == pytest.approx(1.0) and len(fitted["anchors"]) == 2  # one list per head
    missing = CliRunner().invoke(main, ["anchors", "--data", str(dataset / "none"), "--size", "320"])
    assert missing.exit_code == 1 and "dataset.json" in missing.output
