"""YOLO targets against cells, anchors and encodings computed by hand."""

import math

import numpy as np
import pytest

from conftest import cfg_path
from kprune.darknet.builder import build_model
from kprune.detectors.yolo.targets import HeadTarget, TargetEncoder

# yolov2-voc anchors in grid cells; times the stride 32 they are pixels
VOC_ANCHORS = [(1.3221, 1.73145), (3.19275, 4.00944), (5.05587, 8.09892), (9.47112, 4.84053), (11.2364, 10.0071)]


def region_encoder():
    return TargetEncoder([HeadTarget("region", 32, [0, 1, 2, 3, 4])], np.array(VOC_ANCHORS) * 32)


def test_region_target_matches_hand_computation():
    # a 83.2 x 83.2 px box centred at (208, 208) of a 416 input: cell (6, 6), offset (0.5, 0.5);
    # shape IoU with the anchors in pixels: 0.338, 0.528, 0.165, 0.158, 0.060 -> anchor 1 (102.2 x 128.3 px)
    boxes = np.array([[[0.4, 0.4, 0.6, 0.6]]], np.float32)
    targets = region_encoder()(boxes, np.array([[3]], np.int32), (416, 416))
    mask, matching = targets["region"]["mask"].numpy(), targets["region"]["matching"].numpy()
    assert mask.shape == (1, 13, 13, 5, 1) and matching.shape == (1, 13, 13, 5, 5)
    assert mask.sum() == 1 and mask[0, 6, 6, 1, 0] == 1
    expected = [0.5, 0.5, math.log(83.2 / (3.19275 * 32)), math.log(83.2 / (4.00944 * 32)), 3.0]
    np.testing.assert_allclose(matching[0, 6, 6, 1], expected, atol=1e-5)
    assert np.abs(matching).sum() == pytest.approx(np.abs(expected).sum(), abs=1e-4)  # nothing elsewhere
    np.testing.assert_allclose(targets["true_boxes"].numpy()[0, 0], [0.5, 0.5, 0.2, 0.2, 3.0], atol=1e-6)


def test_wide_box_picks_the_wide_anchor_and_offsets_in_the_cell():
    # 300 x 150 px box with centre (100, 330): cell column floor(100/32) = 3, row floor(330/32) = 10;
    # anchor 3 (303.1 x 154.9 px) is the wide one
    cx, cy, w, h = 100 / 416, 330 / 416, 300 / 416, 150 / 416
    boxes = np.array([[[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]]], np.float32)
    targets = region_encoder()(boxes, np.array([[0]], np.int32), (416, 416))
    mask, matching = targets["region"]["mask"].numpy(), targets["region"]["matching"].numpy()
    assert np.argwhere(mask[..., 0]).tolist() == [[0, 10, 3, 3]]
    expected = [100 / 32 - 3, 330 / 32 - 10, math.log(300 / (9.47112 * 32)), math.log(150 / (4.84053 * 32)), 0.0]
    np.testing.assert_allclose(matching[0, 10, 3, 3], expected, atol=1e-5)


def test_padding_and_empty_boxes_give_no_target_and_zero_true_boxes():
    boxes = np.array([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.5, 0.7], [0, 0, 0, 0]]], np.float32)
    labels = np.array([[1, 2, -1]], np.int32)
    targets = region_encoder()(boxes, labels, (416, 416))
    assert targets["region"]["mask"].numpy().sum() == 1
    true_boxes = targets["true_boxes"].numpy()[0]
    np.testing.assert_allclose(true_boxes[0], [0.2, 0.2, 0.2, 0.2, 1.0], atol=1e-6)
    assert np.all(true_boxes[1:] == 0)


def test_two_boxes_on_one_slot_the_later_wins_and_images_stay_apart():
    same = [0.40, 0.40, 0.60, 0.60], [0.41, 0.41, 0.61, 0.61]
    boxes = np.array([same, same], np.float32)
    labels = np.array([[1, 2], [4, 0]], np.int32)
    targets = region_encoder()(boxes, labels, (416, 416))
    mask, matching = targets["region"]["mask"].numpy(), targets["region"]["matching"].numpy()
    assert mask.sum() == 2 and mask[0, 6, 6, 1, 0] == 1 and mask[1, 6, 6, 1, 0] == 1
    assert matching[0, 6, 6, 1, 4] == 2.0 and matching[1, 6, 6, 1, 4] == 0.0


def test_grid_follows_the_batch_size_for_multiscale():
    targets = region_encoder()(np.array([[[0.4, 0.4, 0.6, 0.6]]], np.float32), np.array([[0]], np.int32), (320, 320))
    assert targets["region"]["mask"].shape == (1, 10, 10, 5, 1)
    # 64 x 64 px against 42.3 x 55.4 (IoU 0.572) and 102.2 x 128.3 (0.312): anchor 0, cell (5, 5)
    assert np.argwhere(targets["region"]["mask"].numpy()[..., 0]).tolist() == [[0, 5, 5, 0]]


def test_yolo_heads_get_their_own_anchors_and_strides_and_unused_anchors_never_win():
    anchors = [(10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319)]
    # anchor 0 belongs to no head (a cfg may do that): a 11 x 15 px box goes to anchor 1 instead
    encoder = TargetEncoder([HeadTarget("big", 32, [3, 4, 5]), HeadTarget("small", 16, [1, 2])], anchors)
    boxes = np.array([[[100 / 416, 100 / 416, 111 / 416, 115 / 416], [0.2, 0.3, 0.6, 0.7]]], np.float32)
    targets = encoder(boxes, np.array([[1, 0]], np.int32), (416, 416))
    small, big = targets["small"], targets["big"]
    assert small["mask"].shape == (1, 26, 26, 2, 1) and big["mask"].shape == (1, 13, 13, 3, 1)
    # box 1: centre (105.5, 107.5) px -> cell (6, 6) of stride 16, local anchor 0 (= anchor 1)
    assert np.argwhere(small["mask"].numpy()[..., 0]).tolist() == [[0, 6, 6, 0]]
    np.testing.assert_allclose(
        small["matching"].numpy()[0, 6, 6, 0],
        [105.5 / 16 - 6, 107.5 / 16 - 6, math.log(11 / 23), math.log(15 / 27), 1.0], atol=1e-4)
    # box 2: 166.4 x 166.4 px centred at (166.4, 208) -> anchor 4 (135 x 169), local 1, cell (5, 6)
    assert np.argwhere(big["mask"].numpy()[..., 0]).tolist() == [[0, 6, 5, 1]]


def test_encoder_from_models_of_both_head_kinds():
    v2 = TargetEncoder.from_model(build_model(cfg_path("yolov2-voc"), input_size=320))
    assert [(h.name, h.stride, list(h.anchor_ids)) for h in v2.heads] == [("region_31", 32, [0, 1, 2, 3, 4])]
    np.testing.assert_allclose(v2.anchors_px, np.array(VOC_ANCHORS) * 32, rtol=1e-6)
    v3 = TargetEncoder.from_model(build_model(cfg_path("yolov3-tiny"), input_size=320))
    assert [(h.stride, list(h.anchor_ids)) for h in v3.heads] == [(32, [3, 4, 5]), (16, [0, 1, 2])]
    assert v3.anchors_px[5].tolist() == [344, 319]


def test_bad_anchor_indices_are_refused():
    with pytest.raises(ValueError, match="distinct and below 2"):
        TargetEncoder([HeadTarget("a", 32, [0, 2])], [(1, 1), (2, 2)])
    with pytest.raises(ValueError, match="head a: anchor indices \\[0, 0\\] must be distinct"):
        TargetEncoder([HeadTarget("a", 32, [0, 0])], [(1, 1), (2, 2)])


def test_an_anchor_shared_by_two_heads_gives_targets_in_both():
    """yolov4-tiny's masks 3,4,5 and 1,2,3 share anchor 3: a box it fits best trains both heads."""
    encoder = TargetEncoder([HeadTarget("a", 32, [1, 2]), HeadTarget("b", 16, [0, 1])], [(8, 8), (16, 16), (32, 32)])
    targets = encoder(np.array([[[0.25, 0.25, 0.5, 0.5]]], np.float32), np.array([[1]], np.int32), (64, 64))
    # the 16 x 16 px box: best anchor 1, local index 0 in head a (2 x 2 grid), 1 in head b (4 x 4)
    assert np.argwhere(targets["a"]["mask"].numpy()[..., 0]).tolist() == [[0, 0, 0, 0]]
    assert np.argwhere(targets["b"]["mask"].numpy()[..., 0]).tolist() == [[0, 1, 1, 1]]
    np.testing.assert_allclose(targets["b"]["matching"].numpy()[0, 1, 1, 1], [0.5, 0.5, 0.0, 0.0, 1.0], atol=1e-6)
