"""Faster R-CNN training: the RPN's targets (matching, ignore regions, sampling) and the two-stage
loss, on hand-made cases with hand-computed values."""

import math

import numpy as np
import pytest

from kprune._keras import tf
from kprune.config import build
from kprune.detectors.rcnn.loss import RCNNLoss, RCNNLossOptions, box_distance
from kprune.detectors.rcnn.targets import RPNEncoder, sample
from kprune.models.roi import fpn_anchors


def sixteenths(*boxes):
    """Boxes given in 1/16 of the image (exact in float32)."""
    return np.asarray(boxes, np.float32) / 16


# two true boxes (the second padding-free image has none); anchors a0 .. a6, in 1/16 of the image
TRUTH = sixteenths([0, 0, 8, 8], [10, 10, 14, 14], [0, 0, 0, 0])
ANCHORS = sixteenths(
    [0, 0, 8, 8],     # a0: IoU 1 with box 0 -> positive (also half inside an ignore region: stays)
    [0, 0, 8, 4],     # a1: IoU 0.5 with box 0 -> between 0.3 and 0.7, ignored
    [10, 10, 16, 14],  # a2: IoU 2/3 with box 1, its best (tied with a3) -> positive
    [10, 8, 14, 14],  # a3: IoU 2/3 with box 1, tied -> positive
    [0, 0, 2, 8],     # a4: IoU 0.25 with box 0 -> negative
    [0, 8, 8, 16],    # a5: IoU 0, a quarter inside an ignore region -> negative
    [0, 12, 2, 16],   # a6: IoU 0, inside an ignore region -> ignored
)
IGNORE = sixteenths([0, 12, 4, 16], [4, 0, 8, 8])


def hand_batch():
    boxes = np.stack([TRUTH, np.zeros_like(TRUTH)])
    labels = np.array([[0, 1, -1], [-1, -1, -1]], np.int32)
    return boxes, labels, np.stack([IGNORE, np.zeros_like(IGNORE)])


def test_rpn_targets_by_hand():
    boxes, labels, ignore = hand_batch()
    target = RPNEncoder(ANCHORS, key="head", seed=3)(boxes, labels, ignore=ignore)["head"]
    np.testing.assert_array_equal(target["rpn_labels"], [[1, -1, 1, 1, 0, 0, -1], [0] * 7])
    deltas = np.zeros((2, 7, 4), np.float32)
    # a2 (centre 13, 12; 6 x 4) to box 1 (centre 12, 12; 4 x 4); a3 (centre 12, 11; 4 x 6) alike
    deltas[0, 2] = [-1 / 6, 0, math.log(4 / 6), 0]
    deltas[0, 3] = [0, 1 / 6, 0, math.log(4 / 6)]
    np.testing.assert_allclose(target["rpn_deltas"], deltas, atol=1e-6)
    assert target["rpn_labels"].dtype == tf.int32 and target["rpn_deltas"].dtype == tf.float32
    np.testing.assert_array_equal(target["boxes"], boxes)
    np.testing.assert_array_equal(target["labels"], labels)
    np.testing.assert_array_equal(target["ignore"], ignore)
    # without ignore regions a6 is a plain negative, and the pass-through is one empty region
    target = RPNEncoder(ANCHORS, key="head")(boxes, labels)["head"]
    np.testing.assert_array_equal(target["rpn_labels"][0], [1, -1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(target["ignore"], np.zeros((2, 1, 4)))
    # thresholds 0.6 / 0.55: a2 and a3 positive by IoU, a1 (IoU 0.5) negative
    target = RPNEncoder(ANCHORS, positive=0.6, negative=0.55, key="head")(boxes, labels)["head"]
    np.testing.assert_array_equal(target["rpn_labels"][0], [1, 0, 1, 1, 0, 0, 0])


def caps_case(positives=10, negatives=20):
    """``positives`` anchors equal to the one true box, ``negatives`` far from it."""
    anchors = np.concatenate([np.tile(sixteenths([0, 0, 4, 4]), (positives, 1)),
                              np.tile(sixteenths([8, 8, 12, 12]), (negatives, 1))])
    boxes = np.tile(sixteenths([[0, 0, 4, 4]]), (2, 1, 1))
    return anchors, boxes, np.zeros((2, 1), np.int32)


def test_rpn_sampling_caps_and_seed():
    anchors, boxes, labels = caps_case()
    encoder = RPNEncoder(anchors, per_image=8, positive_fraction=0.5, key="k", seed=7)
    first = encoder(boxes, labels)["k"]["rpn_labels"].numpy()
    assert (first == 1).sum(axis=1).tolist() == [4, 4] and (first == 0).sum(axis=1).tolist() == [4, 4]
    assert (first[:, :10] >= 0).sum() == 8 and (first[:, 10:] == 0).sum() == 8  # positives among the first 10
    assert not np.array_equal(first[0], first[1])  # each image draws its own
    np.testing.assert_array_equal(encoder(boxes, labels)["k"]["rpn_labels"], first)  # the seed fixes the draw
    other = RPNEncoder(anchors, per_image=8, positive_fraction=0.5, key="k", seed=8)(boxes, labels)["k"]
    assert not np.array_equal(other["rpn_labels"], first)
    deltas = encoder(boxes, labels)["k"]["rpn_deltas"].numpy()
    np.testing.assert_array_equal(deltas, 0.0)  # positives sit exactly on their box, the rest are zero
    # one positive available: negatives fill the rest of the sample
    anchors, boxes, labels = caps_case(positives=1)
    few = RPNEncoder(anchors, per_image=8, key="k")(boxes, labels)["k"]["rpn_labels"].numpy()
    assert (few == 1).sum(axis=1).tolist() == [1, 1] and (few == 0).sum(axis=1).tolist() == [7, 7]


def test_sample_with_fewer_candidates_than_asked():
    positive = tf.constant([[True, False, False, False]])
    negative = tf.constant([[False, True, False, False]])
    picked = sample(positive, negative, 256, 0.5, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(picked[0], positive)
    np.testing.assert_array_equal(picked[1], negative)


def test_rpn_encoder_in_a_dataset_map_matches_eager():
    anchors = fpn_anchors(64)
    boxes = np.array([[[0.1, 0.2, 0.5, 0.7], [0.6, 0.1, 0.9, 0.4]], [[0.3, 0.3, 0.6, 0.6], [0, 0, 0, 0]],
                      [[0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    labels = np.array([[0, 2], [1, -1], [-1, -1]], np.int32)
    ignore = np.zeros((3, 2, 4), np.float32)
    ignore[1, 0] = [0, 0, 0.25, 0.25]
    encoder = RPNEncoder(anchors, key="head", seed=5)
    dataset = tf.data.Dataset.from_tensor_slices((boxes, labels, ignore)).batch(3)
    mapped = next(iter(dataset.map(lambda b, l, i: encoder(b, l, tf.constant([64, 64]), i))))["head"]
    eager = encoder(boxes, labels, ignore=ignore)["head"]
    for name in ("rpn_labels", "rpn_deltas"):
        np.testing.assert_array_equal(mapped[name], eager[name])
    counts = mapped["rpn_labels"].numpy()
    assert ((counts >= 0).sum(axis=1) == 256).all() and (counts[2] == 1).sum() == 0
    assert 0 < (counts[0] == 1).sum() <= 128 and 0 < (counts[1] == 1).sum() <= 128


def test_rpn_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"anchors of shape \(3,\)"):
        RPNEncoder(np.zeros(3))
    with pytest.raises(ValueError, match=r"RPN positive = 1.5: must be in \[0, 1\]"):
        RPNEncoder(ANCHORS, positive=1.5)
    with pytest.raises(ValueError, match="RPN negative IoU 0.8 above the positive IoU 0.7"):
        RPNEncoder(ANCHORS, negative=0.8)
    with pytest.raises(ValueError, match="RPN per_image = 0: must be a whole number >= 1"):
        RPNEncoder(ANCHORS, per_image=0)


# the loss's hand-made case: A = 4 anchors, K = 4 proposals, C = 2 classes, 2 images
RPN_LABELS = np.array([[1, 0, -1, 0], [-1, 0, 1, 1]], np.int32)
RPN_TARGET = np.zeros((2, 4, 4), np.float32)
RPN_TARGET[0, 0] = [0.5, 0.25, 0.1, -0.1]
RPN_TARGET[1, 2] = [0.0, 0.0, 0.5, 0.0]


def loss_targets():
    boxes = np.stack([sixteenths([0, 0, 8, 8], [0, 0, 0, 0]), sixteenths([8, 8, 16, 16], [0, 0, 0, 0])])
    labels = np.array([[1, -1], [0, -1]], np.int32)
    ignore = np.stack([sixteenths([0, 0, 0, 0]), sixteenths([0, 0, 8, 8])])
    return {"head": {"rpn_labels": RPN_LABELS, "rpn_deltas": RPN_TARGET, "boxes": boxes, "labels": labels,
                     "ignore": ignore}}


def loss_outputs():
    rpn_logits = np.zeros((2, 4), np.float32)
    rpn_logits[0, 0] = 2.0  # positive: log(1 + e^-2)
    rpn_logits[0, 2] = 100.0  # not sampled: excluded
    rpn_deltas = RPN_TARGET.copy()
    rpn_deltas[0, 0] += [0.5, -0.5, 0, 0]  # L1 1.0
    rpn_deltas[1, 2] += [0, 0, 0.25, 0]  # L1 0.25
    rpn_deltas[1, 3] += [0, 0, 0, -0.125]  # L1 0.125
    rpn_deltas[0, 1] += 50.0  # a negative: no box loss
    proposals = np.stack([
        sixteenths([0, 0, 8, 8],     # IoU 1 with the class-1 box: foreground, target class 2
                   [0, 0, 8, 4],     # IoU 0.5: foreground (the threshold is inclusive)
                   [8, 8, 16, 16],   # IoU 0: background
                   [0, 0, 0, 0]),    # padding: never sampled
        sixteenths([8, 8, 16, 16],   # IoU 1 with the class-0 box: foreground, target class 1
                   [0, 0, 4, 4],     # background inside the ignore region: not sampled
                   [0, 8, 8, 16],    # background
                   [0, 0, 0, 0])])   # padding
    class_logits = np.zeros((2, 4, 3), np.float32)
    class_logits[0, 2] = [1, 0, 0]  # background: log(e + 2) - 1
    class_logits[0, 3] = class_logits[1, 1] = class_logits[1, 3] = [-100, 100, 0]  # excluded rows
    box_deltas = np.full((2, 4, 2, 4), 50.0, np.float32)  # every delta but the true class's is ignored
    box_deltas[0, 0, 1] = [0.1, -0.2, 0, 0]  # target 0: L1 0.3
    # proposal (0, 0, 8, 4) to box (0, 0, 8, 8): dy = 10 * 2 / 4 = 5, dh = 5 log 2; predicted 0
    box_deltas[0, 1, 1] = 0.0
    box_deltas[1, 0, 0] = [0, 0, 0.4, 0]  # target 0: L1 0.4
    return [rpn_logits, rpn_deltas, proposals, class_logits, box_deltas]


RPN_CLASS = (math.log(1 + math.exp(-2)) + 5 * math.log(2)) / 6  # 6 anchors sampled
RPN_BOX = (1.0 + 0.25 + 0.125) / 6
ROI_CLASS = (4 * math.log(3) + math.log(math.e + 2) - 1) / 5  # 5 proposals sampled
ROI_BOX = (0.3 + 5 + 5 * math.log(2) + 0.4) / 5


def test_loss_by_hand():
    options = RCNNLossOptions(rpn_box_weight=2.0, roi_box_weight=3.0)
    terms = RCNNLoss(options, key="head", classes=2)(loss_targets(), [tf.constant(o) for o in loss_outputs()])
    assert RCNNLoss.terms == ("rpn_class", "rpn_box", "roi_class", "roi_box", "loss")
    assert set(terms) == set(RCNNLoss.terms)
    expected = {"rpn_class": RPN_CLASS, "rpn_box": 2 * RPN_BOX, "roi_class": ROI_CLASS, "roi_box": 3 * ROI_BOX}
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    assert float(terms["loss"]) == pytest.approx(sum(expected.values()), rel=1e-5)
    # smooth L1 with beta 1: 0.5 x^2 per coordinate below 1
    smooth = RCNNLoss(RCNNLossOptions(smooth_l1_beta=1.0), key="head")(loss_targets(), loss_outputs())
    assert float(smooth["rpn_box"]) == pytest.approx((0.5 * 0.25 * 2 + 0.5 * 0.0625 + 0.5 * 0.015625) / 6, rel=1e-5)
    np.testing.assert_allclose(box_distance(tf.constant([-3.0, 0.5]), 2.0), [2.0, 0.0625])


def test_loss_takes_bfloat16_and_runs_in_a_function_and_a_strategy():
    loss = RCNNLoss(key="head", classes=2)
    eager = loss(loss_targets(), loss_outputs())
    traced = tf.function(loss)(loss_targets(), [tf.constant(o) for o in loss_outputs()])
    for name in RCNNLoss.terms:
        assert float(traced[name]) == pytest.approx(float(eager[name]), rel=1e-6)
    low = loss(loss_targets(), [tf.constant(o, tf.bfloat16) for o in loss_outputs()])
    assert all(value.dtype == tf.float32 for value in low.values())
    # bfloat16 keeps 8 bits: the deltas 0.1, 0.2, 5 log 2 move the box terms by well under 1 %
    for name in RCNNLoss.terms:
        assert float(low[name]) == pytest.approx(float(eager[name]), rel=1e-2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    replica = strategy.run(tf.function(loss), args=(loss_targets(), [tf.constant(o) for o in loss_outputs()]))
    assert float(strategy.reduce("SUM", replica["loss"], axis=None)) == pytest.approx(float(eager["loss"]), rel=1e-6)


def test_gradients_reach_logits_and_deltas_not_proposals():
    outputs = [tf.Variable(o) for o in loss_outputs()]
    with tf.GradientTape() as tape:
        total = RCNNLoss(key="head", classes=2)(loss_targets(), outputs)["loss"]
    rpn_logits, rpn_deltas, proposals, class_logits, box_deltas = tape.gradient(total, outputs)
    assert proposals is None
    sampled = RPN_LABELS >= 0
    assert (rpn_logits.numpy()[sampled] != 0).all() and (rpn_logits.numpy()[~sampled] == 0).all()
    assert rpn_logits.numpy()[0, 1] == pytest.approx(0.5 / 6)  # (sigmoid(0) - 0) / 6
    moved = np.abs(rpn_deltas.numpy()).sum(axis=-1) > 0
    np.testing.assert_array_equal(moved, RPN_LABELS == 1)
    rows = np.abs(class_logits.numpy()).sum(axis=-1) > 0
    np.testing.assert_array_equal(rows, [[True, True, True, False], [True, False, True, False]])
    np.testing.assert_allclose(class_logits.numpy()[1, 2], np.array([1 / 3 - 1, 1 / 3, 1 / 3]) / 5, rtol=1e-5)
    boxes = np.abs(box_deltas.numpy()).sum(axis=-1) > 0  # (B, K, C): only the true class of the foreground
    expected = np.zeros((2, 4, 2), bool)
    expected[0, 0, 1] = expected[0, 1, 1] = expected[1, 0, 0] = True
    np.testing.assert_array_equal(boxes, expected)


def test_roi_sampling_caps_and_repeats():
    """10 foreground and 10 background proposals, 8 sampled per image of which at most a quarter
    foreground: 2 foreground and 6 background, the same draw for the same batch."""
    proposals = np.concatenate([np.tile(sixteenths([0, 0, 8, 8]), (10, 1)),
                                np.tile(sixteenths([8, 8, 16, 16]), (10, 1))])[None]
    targets = {"head": {"rpn_labels": np.zeros((1, 1), np.int32), "rpn_deltas": np.zeros((1, 1, 4), np.float32),
                        "boxes": sixteenths([[0, 0, 8, 8]]), "labels": np.array([[0]], np.int32),
                        "ignore": np.zeros((1, 1, 4), np.float32)}}
    outputs = [tf.zeros([1, 1]), tf.zeros([1, 1, 4]), tf.constant(proposals), tf.Variable(tf.zeros([1, 20, 2])),
               tf.zeros([1, 20, 1, 4])]
    loss = RCNNLoss(RCNNLossOptions(roi_per_image=8), key="head")

    def sampled_rows():
        with tf.GradientTape() as tape:
            value = loss(targets, outputs)["roi_class"]
        return np.abs(tape.gradient(value, outputs[3]).numpy()[0]).sum(axis=-1) > 0

    rows = sampled_rows()
    assert rows[:10].sum() == 2 and rows[10:].sum() == 6
    np.testing.assert_array_equal(sampled_rows(), rows)


def test_options_validation():
    def options(**values):
        return build(RCNNLossOptions, values, "loss (a rcnn model)")

    assert options() == RCNNLossOptions()
    assert options(box_weights=[10, 10, 5, 5]).box_weights == (10.0, 10.0, 5.0, 5.0)
    with pytest.raises(ValueError, match=r"rpn_positive_iou = 1.5: must be in \[0, 1\]"):
        options(rpn_positive_iou=1.5)
    with pytest.raises(ValueError, match=r"rpn_negative_iou = 0.8: must be <= rpn_positive_iou \(0.7\)"):
        options(rpn_negative_iou=0.8)
    with pytest.raises(ValueError, match="roi_per_image = 0: must be >= 1"):
        options(roi_per_image=0)
    with pytest.raises(ValueError, match="smooth_l1_beta = -1.0: must be >= 0"):
        options(smooth_l1_beta=-1)
    with pytest.raises(ValueError, match=r"box_weights = \[10.0, 0.0, 5.0, 5.0\]: must be four numbers > 0"):
        options(box_weights=[10, 0, 5, 5])
    with pytest.raises(ValueError, match="box_weights"):
        options(box_weights=[10, 10, 5])
    with pytest.raises(ValueError, match="unknown key.*rpn_iou.*known keys: rpn_positive_iou"):
        options(rpn_iou=0.5)
    encoder = RPNEncoder.from_options(ANCHORS, options(rpn_per_image=4, rpn_positive_iou=0.9), key="head")
    assert (encoder.per_image, encoder.positive, encoder.negative) == (4, 0.9, 0.3)
    with pytest.raises(ValueError, match="3 output"):
        RCNNLoss(key="head")(loss_targets(), loss_outputs()[:3])
    with pytest.raises(ValueError, match=r"a model of 3 classes gives \(B, K, 4\)"):
        RCNNLoss(key="head", classes=3)(loss_targets(), loss_outputs())
