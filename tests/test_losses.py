"""The YOLO losses against values computed by hand on a one-cell grid."""

import math

import numpy as np
import pytest

from conftest import cfg_path
from kprune._keras import tf
from kprune.darknet.builder import build_model
from kprune.detectors.yolo.targets import HeadTarget, TargetEncoder
from kprune.detectors.yolo.loss import LossHead, LossOptions, YoloLoss

LN2 = math.log(2.0)
# one 32 px input, one cell; anchors of 16 and 32 px; two classes
ANCHORS = [(16.0, 16.0), (32.0, 32.0)]
CENTRED = [0.25, 0.25, 0.75, 0.75]  # 16 x 16 px in the middle: anchor 0, IoU 1 with its prediction


def targets_for(boxes, labels, ignore=None, kind_anchors=ANCHORS):
    encoder = TargetEncoder([HeadTarget("h", 32, list(range(len(kind_anchors))))], kind_anchors)
    boxes = np.asarray(boxes, np.float32).reshape(len(labels), -1, 4)
    targets = encoder(boxes, np.asarray(labels, np.int32).reshape(len(labels), -1), (32, 32))
    if ignore is not None:
        targets["ignore"] = tf.constant(np.asarray(ignore, np.float32).reshape(len(labels), -1, 4))
    return targets


def region_loss(options=LossOptions(), anchors=ANCHORS):
    return YoloLoss([LossHead("h", "region", 2, 32, anchors)], options)


def raw(values_per_anchor):
    """Raw head output (1, 1, 1, A * 7) from per-anchor (tx, ty, tw, th, to, c0, c1)."""
    return tf.constant(np.asarray(values_per_anchor, np.float32).reshape(1, 1, 1, -1))


def test_region_loss_by_hand():
    targets = targets_for([CENTRED], [[1]])
    terms = {k: float(v) for k, v in region_loss()(targets, [raw(np.zeros((2, 7)))]).items()}
    # anchor 0 (responsible): coords 0; objects 0.5*5*(IoU 1 - 0.5)^2; classes 0.5*(0.5^2 + 0.5^2)
    # anchor 1: its 32 px box has IoU 0.25 < 0.6 with the true box -> no-object 0.5*0.5^2
    assert terms["coordinates"] == pytest.approx(0.0, abs=1e-7)
    assert terms["objects"] == pytest.approx(0.625)
    assert terms["classes"] == pytest.approx(0.25)
    assert terms["no_objects"] == pytest.approx(0.125)
    assert terms["loss"] == pytest.approx(1.0)


def test_region_class_cross_entropy_option_by_hand():
    targets = targets_for([CENTRED], [[1]])
    terms = region_loss(LossOptions(class_loss="cross_entropy"))(targets, [raw(np.zeros((2, 7)))])
    assert float(terms["classes"]) == pytest.approx(LN2)  # -log(softmax) of two equal logits, not halved
    output = np.zeros((2, 7))
    output[0, 6] = 2.0  # the true class' logit
    terms = region_loss(LossOptions(class_loss="cross_entropy", class_scale=3.0))(targets, [raw(output)])
    assert float(terms["classes"]) == pytest.approx(3.0 * math.log(1 + math.exp(-2.0)), rel=1e-6)
    with pytest.raises(ValueError, match="class_loss = 'focal'"):
        LossOptions(class_loss="focal")


def test_region_loss_rescore_uses_the_iou_of_the_shifted_prediction():
    targets = targets_for([CENTRED], [[1]])
    output = np.zeros((2, 7))
    output[0, 0] = 1.0  # x moves to sigmoid(1) = 0.7311 of the cell
    terms = region_loss()(targets, [raw(output)])
    x = 1 / (1 + math.exp(-1))
    iou = (0.75 - (x - 0.25)) * 0.5 / (0.25 + 0.25 - (0.75 - (x - 0.25)) * 0.5)
    assert float(terms["coordinates"]) == pytest.approx(0.5 * (0.5 - x) ** 2, rel=1e-5)
    assert float(terms["objects"]) == pytest.approx(0.5 * 5 * (iou - 0.5) ** 2, rel=1e-4)
    plain = region_loss(LossOptions(rescore=False))(targets, [raw(output)])
    assert float(plain["objects"]) == pytest.approx(0.625)


def test_ignore_region_removes_the_no_object_term():
    # with anchors 16 and 32 px, anchor 1 predicts the whole image: inside the ignore region
    targets = targets_for([CENTRED], [[1]], ignore=[[0.0, 0.0, 1.0, 1.0]])
    terms = region_loss()(targets, [raw(np.zeros((2, 7)))])
    assert float(terms["no_objects"]) == pytest.approx(0.0, abs=1e-7)
    assert float(terms["loss"]) == pytest.approx(0.875)
    half = targets_for([CENTRED], [[1]], ignore=[[0.0, 0.0, 0.4, 1.0]])  # 40 % of it inside: still counted
    assert float(region_loss()(half, [raw(np.zeros((2, 7)))])["no_objects"]) == pytest.approx(0.125)


def test_loss_is_averaged_per_image_and_finite_without_objects_or_with_wild_outputs():
    one = region_loss()(targets_for([CENTRED], [[1]]), [raw(np.zeros((2, 7)))])
    two = region_loss()(targets_for([CENTRED, CENTRED], [[1], [1]]),
                        [tf.concat([raw(np.zeros((2, 7)))] * 2, axis=0)])
    assert float(two["loss"]) == pytest.approx(float(one["loss"]))
    empty = region_loss()(targets_for([[0, 0, 0, 0]], [[-1]]), [raw(np.zeros((2, 7)))])
    assert float(empty["loss"]) == pytest.approx(0.25)  # two anchors, 0.5 * 0.5^2 each
    tiny = targets_for([[0.5, 0.5, 0.5 + 1e-7, 0.5 + 1e-7]], [[0]])
    for value in (1e4, -1e4):
        terms = region_loss()(tiny, [raw(np.full((2, 7), value))])
        assert all(np.isfinite(float(v)) for v in terms.values())


def test_yolo_loss_by_hand():
    targets = targets_for([CENTRED], [[1]], kind_anchors=ANCHORS[:1])
    loss = YoloLoss([LossHead("h", "yolo", 2, 32, ANCHORS[:1])], LossOptions(object_scale=1.0, threshold=0.5))
    terms = {k: float(v) for k, v in loss(targets, [raw(np.zeros((1, 7)))]).items()}
    # box scale 2 - 0.5*0.5; BCE(0.5, logit 0) = ln 2 for x and y; w, h exact
    assert terms["coordinates"] == pytest.approx(1.75 * 2 * LN2, rel=1e-6)
    assert terms["objects"] == pytest.approx(LN2, rel=1e-6)
    assert terms["no_objects"] == pytest.approx(0.0, abs=1e-7)
    assert terms["classes"] == pytest.approx(2 * LN2, rel=1e-6)
    assert terms["loss"] == pytest.approx(1.75 * 2 * LN2 + 3 * LN2, rel=1e-6)


def assert_gradients_flow(model, loss):
    """The loss of a 64 px model on one box is finite and every trainable variable gets a gradient."""
    encoder = TargetEncoder.from_model(model)
    targets = encoder(np.array([[CENTRED]], np.float32), np.array([[1]], np.int32), (64, 64))
    images = tf.random.uniform((1, 64, 64, 3), seed=1)
    with tf.GradientTape() as tape:
        terms = loss(targets, model(images, training=True))
    grads = tape.gradient(terms["loss"], model.trainable_variables)
    assert np.isfinite(float(terms["loss"])) and all(g is not None for g in grads)


def test_loss_from_models_and_gradients_flow():
    for name, threshold in (("yolov2-tiny-voc", 0.6), ("yolov3-tiny", 0.5)):
        model = build_model(cfg_path(name), input_size=64, classes=3)
        loss = YoloLoss.from_model(model)
        assert loss.options.threshold == threshold
        assert_gradients_flow(model, loss)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="object_scale = -1"):
        LossOptions(object_scale=-1)
    with pytest.raises(ValueError, match="threshold = 1.5"):
        LossOptions(threshold=1.5)


def test_region_small_box_scale_weighs_coordinates_by_two_minus_area():
    targets = targets_for([CENTRED], [[1]])  # a 16 x 16 px box in a 32 px image: w h = 0.25
    output = np.zeros((2, 7))
    output[0, 0] = 1.0
    x = 1 / (1 + math.exp(-1))
    plain = region_loss(LossOptions(rescore=False))(targets, [raw(output)])
    scaled = region_loss(LossOptions(rescore=False, small_box_scale=True))(targets, [raw(output)])
    assert float(plain["coordinates"]) == pytest.approx(0.5 * (0.5 - x) ** 2, rel=1e-5)
    assert float(scaled["coordinates"]) == pytest.approx(1.75 * 0.5 * (0.5 - x) ** 2, rel=1e-5)
    assert float(scaled["objects"]) == pytest.approx(float(plain["objects"]))
