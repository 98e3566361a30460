"""The IoU family and the YOLO loss of the AlexeyAB fork's heads (scale_x_y, new_coords, CIoU),
against values computed by hand."""

import math

import numpy as np
import pytest

from kprune import detectors
from kprune._keras import tf
from kprune.boxes import paired_ious
from kprune.detectors.yolo.loss import LossHead, LossOptions, YoloLoss
from kprune.detectors.yolo.decode import cell_offset_and_size
from test_losses import ANCHORS, CENTRED, LN2, assert_gradients_flow, raw, targets_for


def test_iou_family_by_hand():
    # two 2 x 2 squares overlapping in a 1 x 1 square: I = 1, U = 7, enclosing 3 x 3
    got = {k: float(v) for k, v in paired_ious([0, 0, 2, 2], [1, 1, 3, 3]).items()}
    assert got["iou"] == pytest.approx(1 / 7)
    assert got["giou"] == pytest.approx(1 / 7 - 2 / 9)
    assert got["diou"] == pytest.approx(1 / 7 - 2 / 18)  # centres 1 apart in x and y; diagonal^2 18
    assert got["ciou"] == pytest.approx(got["diou"])  # the same aspect ratio: v = 0
    # a 2 x 2 square in the left half of a 4 x 2 box: I = 4, U = 8, enclosing = the 4 x 2 box
    got = {k: float(v) for k, v in paired_ious([0, 0, 2, 2], [0, 0, 4, 2]).items()}
    v = 4 / math.pi ** 2 * (math.atan(2) - math.atan(1)) ** 2
    assert (got["iou"], got["giou"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert got["diou"] == pytest.approx(0.5 - 1 / 20)
    assert got["ciou"] == pytest.approx(0.45 - v / (0.5 + v) * v, rel=1e-6)  # 0.446752
    assert got["ciou"] == pytest.approx(0.446752, abs=1e-6)


def test_ciou_alpha_is_held_constant_for_the_gradient():
    a = tf.Variable([0.0, 0.0, 2.0, 2.0])
    with tf.GradientTape() as tape:
        ciou = paired_ious(a, tf.constant([0.0, 0.0, 4.0, 2.0]))["ciou"]
    grad = tape.gradient(ciou, a).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def fork_loss(scale_x_y=1.0, new_coords=0, **options):
    head = LossHead("h", "yolo", 2, 32, ANCHORS[:1], scale_x_y, new_coords)
    return YoloLoss([head], LossOptions(object_scale=1.0, threshold=0.5, **options))


def test_ciou_loss_is_zero_for_the_exact_box_and_its_value_for_a_shifted_one():
    targets = targets_for([CENTRED], [[1]], kind_anchors=ANCHORS[:1])  # 16 px box centred, anchor 16 px
    loss = fork_loss(box_loss="ciou", iou_normalizer=0.07)
    exact = float(loss(targets, [raw(np.zeros((1, 7)))])["coordinates"])  # offset 0.5, size 1 anchor
    assert exact == pytest.approx(0.0, abs=1e-6)
    shifted = np.zeros((1, 7))
    shifted[0, 2] = math.log(2.0)  # twice as wide: 32 x 16 px around the same centre
    got = float(loss(targets, [raw(shifted)])["coordinates"])
    # I = 16 x 16, U = 32 x 16: IoU 0.5; same centre: DIoU 0.5; v = 4/pi^2 (atan 1 - atan 2)^2
    v = 4 / math.pi ** 2 * (math.atan(1) - math.atan(2)) ** 2
    assert got == pytest.approx(0.07 * (1 - (0.5 - v / (0.5 + v) * v)), rel=1e-5)


def test_new_coords_head_takes_probabilities_and_its_own_size_targets():
    targets = targets_for([CENTRED], [[1]], kind_anchors=ANCHORS[:1])
    # new_coords, scale 2: centre (2 p - 0.5 + col) / grid, size (2 p)^2 anchors. p = 0.5 gives the
    # cell's middle and one anchor: the exact box.
    output = np.full((1, 7), 0.5)
    terms = {k: float(v) for k, v in fork_loss(2.0, 1, box_loss="ciou")(targets, [raw(output)]).items()}
    assert terms["coordinates"] == pytest.approx(0.0, abs=1e-6)
    assert terms["objects"] == pytest.approx(LN2, rel=1e-5)  # BCE(1, p = 0.5)
    assert terms["classes"] == pytest.approx(2 * LN2, rel=1e-5)
    # mse box loss: offset target (0.5 + 0.5) / 2 = 0.5 -> BCE ln 2 per coordinate; size target
    # sqrt(1) / 2 = 0.5 = p -> 0; weighted by 2 - w h = 2 - 0.25
    terms = fork_loss(2.0, 1)(targets, [raw(output)])
    assert float(terms["coordinates"]) == pytest.approx(1.75 * 2 * LN2, rel=1e-5)


def test_the_loss_predicts_the_boxes_decoding_gives():
    x = tf.constant([[0.3, 0.8, -0.4, 0.9]])
    offset, size = cell_offset_and_size(x, 1.05, 0)
    sigmoid = 1 / (1 + np.exp(-np.array([0.3, 0.8])))
    np.testing.assert_allclose(offset.numpy()[0], sigmoid * 1.05 - 0.025, rtol=1e-6)
    np.testing.assert_allclose(size.numpy()[0], np.exp([-0.4, 0.9]), rtol=1e-6)
    offset, size = cell_offset_and_size(tf.constant([[0.3, 0.8, 0.4, 0.9]]), 2.0, 1)
    np.testing.assert_allclose(offset.numpy()[0], [0.1, 1.1], rtol=1e-6)
    np.testing.assert_allclose(size.numpy()[0], [0.64, 3.24], rtol=1e-6)


@pytest.mark.parametrize("name, expected", [
    ("yolov4-tiny", dict(box_loss="ciou", iou_normalizer=0.07, class_scale=1.0, object_scale=1.0)),
    ("yolov7-tiny", dict(box_loss="ciou", iou_normalizer=0.05, class_scale=0.5, object_scale=1.0)),
    ("yolov3-tiny", dict(box_loss="mse", class_scale=1.0, object_scale=1.0, no_object_scale=1.0))])
def test_a_fork_model_trains_with_its_cfgs_loss_settings(name, expected):
    model = detectors.build(name, input_size=64, classes=2, width=0.25)
    options = detectors.family_of(model).default_loss_options(model)
    assert {k: getattr(options, k) for k in expected} == pytest.approx(expected)
    loss = YoloLoss.from_model(model, options)
    heads = {h.name: h for h in loss.heads}
    assert {h.scale_x_y for h in heads.values()} == {{"yolov4-tiny": 1.05, "yolov7-tiny": 2.0}.get(name, 1.0)}
    assert_gradients_flow(model, loss)


def test_bad_box_loss_is_refused():
    with pytest.raises(ValueError, match="box_loss = 'eiou': choose one of mse, iou, giou, diou, ciou"):
        LossOptions(box_loss="eiou")


def test_a_head_behind_its_activation_gets_new_classes():
    """YOLOv7's head convs apply the logistic as a layer of their own: the predictor convs are found
    behind it, and a new head for the dataset's classes replaces those convs."""
    model = detectors.build("yolov7-tiny", input_size=64, classes=80, width=0.25)
    family = detectors.family_of(model)
    assert [(name, conv.filters) for name, conv in family.predictor_convs(model).items()] == [
        ("conv_89", 255), ("conv_93", 255), ("conv_97", 255)]
    fitted = family.replace_classes(model, 5, ["a", "b", "c", "d", "e"])
    assert [conv.filters for conv in family.predictor_convs(fitted).values()] == [30, 30, 30]
    assert [head.classes for head in family.heads(fitted)] == [5, 5, 5]


def test_distillation_of_a_new_coords_head_reads_probabilities():
    """yolov7-tiny's heads output probabilities: objectness 0.75 against the teacher's 0.5 is the same
    Bernoulli KL, 0.5 ln(4/3), as logit ln 3 against 0 in a YOLOv3 head."""
    model = detectors.build("yolov7-tiny", input_size=64, classes=5, width=0.125)
    distill = detectors.family_of(model).distillation(model)
    teacher = [np.full((1, g, g, 3 * 10), 0.5, np.float32) for g in (8, 4, 2)]  # objectness 0.5 everywhere
    student = [t.copy() for t in teacher]
    student[1][0, 2, 3, 4] = 0.75
    assert float(distill(teacher, teacher)["distill"]) == pytest.approx(0.0, abs=1e-5)
    assert float(distill(student, teacher)["distill"]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-4)
