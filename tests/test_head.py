"""Decoding against hand-computed boxes, NMS, and mapping back through letterbox / resize."""

import math

import numpy as np
import pytest

from kprune.boxes import iou_matrix
from kprune.detectors.yolo.decode import decode_head
from kprune.models.head import image_transform, non_max_suppression, preprocess_image
from kprune.models.layers import DetectionHead


def _logit(p):
    return math.log(p / (1 - p))


def test_region_decode_by_hand():
    head = DetectionHead("region", [[1.0, 2.0], [3.0, 1.0]], classes=2)
    out = np.zeros((1, 2, 2, 2 * 7), np.float32)
    # anchor 1 at row 1, col 0: tx=ty=0 (centre of the cell), tw=log(0.5), th=0, p(object)=0.8
    out[0, 1, 0, 7:14] = [0.0, 0.0, math.log(0.5), 0.0, _logit(0.8), 2.0, 0.0]
    boxes, scores = decode_head(out, head, (64, 64))
    assert boxes.shape == (1, 8, 4) and scores.shape == (1, 8, 2)
    index = (1 * 2 + 0) * 2 + 1  # (row, col, anchor) flattened
    # centre ((0 + 0.5) / 2, (1 + 0.5) / 2) = (0.25, 0.75); size (3 * 0.5 / 2, 1 * 1 / 2) = (0.75, 0.5)
    np.testing.assert_allclose(boxes[0, index], [0.25 - 0.375, 0.75 - 0.25, 0.25 + 0.375, 1.0], atol=1e-6)
    softmax = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    np.testing.assert_allclose(scores[0, index], 0.8 * softmax, rtol=1e-5)
    # all-zero logits: p(object) 0.5, uniform classes
    np.testing.assert_allclose(scores[0, 0], [0.25, 0.25], rtol=1e-6)


def test_yolo_decode_by_hand():
    head = DetectionHead("yolo", [[10, 14], [16, 32], [37, 58]], classes=1, mask=[1])
    out = np.zeros((1, 4, 4, 6), np.float32)
    out[0, 2, 3] = [_logit(0.25), 0.0, 0.0, math.log(2.0), _logit(0.9), _logit(0.5)]
    boxes, scores = decode_head(out, head, (64, 128))
    index = 2 * 4 + 3
    # centre ((3 + 0.25) / 4, (2 + 0.5) / 4); size (16 / 128, 2 * 32 / 64): anchors in input pixels
    cx, cy, w, h = 3.25 / 4, 2.5 / 4, 16 / 128, 1.0
    np.testing.assert_allclose(boxes[0, index], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-6)
    np.testing.assert_allclose(scores[0, index], [0.9 * 0.5], rtol=1e-5)


def test_fork_yolo_decode_by_hand():
    # scale_x_y=1.05 on YOLOv3's coordinates: x = (sigmoid(tx) * 1.05 - 0.025 + col) / grid
    head = DetectionHead("yolo", [[16, 32]], classes=1, scale_x_y=1.05)
    out = np.zeros((1, 4, 4, 6), np.float32)
    out[0, 2, 3] = [_logit(0.25), 0.0, 0.0, math.log(2.0), _logit(0.9), _logit(0.5)]
    boxes, scores = decode_head(out, head, (64, 128))
    cx, cy, w, h = (3 + 0.25 * 1.05 - 0.025) / 4, (2 + 0.5 * 1.05 - 0.025) / 4, 16 / 128, 1.0
    np.testing.assert_allclose(boxes[0, 11], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-6)
    np.testing.assert_allclose(scores[0, 11], [0.9 * 0.5], rtol=1e-5)
    # new_coords=1, scale_x_y=2 (YOLOv7): outputs are probabilities already; x = (2 p - 0.5 + col) / grid,
    # w = (2 p_w)^2 * anchor_w / input_w
    head = DetectionHead("yolo", [[16, 32]], classes=1, scale_x_y=2.0, new_coords=1)
    out[0, 2, 3] = [0.25, 0.5, 0.5, 0.75, 0.9, 0.5]
    boxes, scores = decode_head(out, head, (64, 128))
    cx, cy, w, h = (3 + 0.5 - 0.5) / 4, (2 + 1.0 - 0.5) / 4, 1.0 * 16 / 128, 2.25 * 32 / 64
    np.testing.assert_allclose(boxes[0, 11], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-6)
    np.testing.assert_allclose(scores[0, 11], [0.9 * 0.5], rtol=1e-6)


def test_nms_per_class():
    boxes = np.float32([[[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]]])
    scores = np.float32([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.1, 0.0]]])
    (kept, kept_scores, classes), = non_max_suppression(boxes, scores, score_threshold=0.2, iou_threshold=0.5)
    # box 1 overlaps box 0 (IoU 9/11) in class 0 and goes; box 2 is class 1 and stays; box 3 is below 0.2.
    np.testing.assert_allclose(kept, [[0, 0, 10, 10], [0, 0, 10, 10]])
    np.testing.assert_allclose(kept_scores, [0.9, 0.7])
    assert classes.tolist() == [0, 1]
    (kept, _, _), = non_max_suppression(boxes, scores, score_threshold=0.2, iou_threshold=0.9)
    assert len(kept) == 3  # IoU 0.818 < 0.9: both class-0 boxes stay
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        non_max_suppression(boxes, scores, iou_threshold=1.5)


def test_letterbox_transform_round_trip():
    transform = image_transform((100, 200), (64, 64), letterbox=True)
    assert transform.scale_xy == (0.32, 0.32) and transform.offset_xy == (0, 16)
    # a box covering the whole image occupies rows 16..48 of the input
    np.testing.assert_allclose(transform.to_image([[0, 16 / 64, 1, 48 / 64]]), [[0, 0, 200, 100]])
    stretched = image_transform((100, 200), (64, 64), letterbox=False)
    np.testing.assert_allclose(stretched.to_image([[0.25, 0.5, 0.5, 1.0]]), [[50, 50, 100, 100]])


def test_preprocess_places_image_on_grey_canvas():
    image = np.full((100, 200, 3), 255, np.uint8)
    canvas, transform = preprocess_image(image, (64, 64))
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.float32
    assert np.all(canvas[:16] == 0.5) and np.all(canvas[48:] == 0.5) and np.all(canvas[16:48] == 1.0)


def test_extreme_aspect_ratio_keeps_one_pixel():
    canvas, transform = preprocess_image(np.zeros((1, 2000, 3), np.uint8), (64, 64))
    assert canvas.shape == (64, 64, 3) and transform.scale_xy[1] == 1.0


def test_iou_continuous():
    assert iou_matrix([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)
    assert iou_matrix([[0, 0, 1, 1]], [[2, 2, 3, 3]])[0, 0] == 0.0
