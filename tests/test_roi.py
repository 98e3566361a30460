"""kprune.models.roi: FPN anchors, the box coder, RoIAlign against a reference written from its
definition, proposals on hand cases, and a tiny two-stage model through save/load and TFLite."""

import math

import numpy as np
import pytest

from kprune._keras import keras, tf
from kprune.models import roi

S2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------- anchors

def test_level_sizes_are_ceil_of_input_over_stride():
    assert roi.level_sizes(800) == [200, 100, 50, 25, 13]
    assert roi.level_sizes(64, (32, 64)) == [2, 1]
    assert roi.level_sizes(65, (4, 8)) == [17, 9]


def test_fpn_anchors_of_a_tiny_case_by_hand():
    anchors = roi.fpn_anchors(64, strides=(32, 64), sizes=(32, 64), ratios=(0.5, 1.0, 2.0))
    assert anchors.shape == (2 * 2 * 3 + 1 * 3, 4) and anchors.dtype == np.float32
    px = anchors.astype(np.float64) * 64
    # level 0 (stride 32, size 32), cell (0, 0) centred at (16, 16); ratio 0.5: w = 32 sqrt 2, h = 32 / sqrt 2
    np.testing.assert_allclose(px[0], [16 - 16 * S2, 16 - 8 * S2, 16 + 16 * S2, 16 + 8 * S2], atol=1e-4)
    np.testing.assert_allclose(px[1], [0, 0, 32, 32], atol=1e-4)  # ratio 1
    np.testing.assert_allclose(px[2], [16 - 8 * S2, 16 - 16 * S2, 16 + 8 * S2, 16 + 16 * S2], atol=1e-4)  # h / w = 2
    # row-major: anchors 3..5 are cell (row 0, column 1) centred at x = 48, anchors 6..8 cell (1, 0)
    np.testing.assert_allclose(px[4], [32, 0, 64, 32], atol=1e-4)
    np.testing.assert_allclose(px[7], [0, 32, 32, 64], atol=1e-4)
    np.testing.assert_allclose(px[10], [32, 32, 64, 64], atol=1e-4)
    # level 1 (stride 64, size 64): one cell centred at (32, 32)
    np.testing.assert_allclose(px[13], [0, 0, 64, 64], atol=1e-4)
    np.testing.assert_allclose(px[14], [32 - 16 * S2, 32 - 32 * S2, 32 + 16 * S2, 32 + 32 * S2], atol=1e-4)
    # every anchor keeps the area size^2 and h / w = ratio
    wh = px[:, 2:] - px[:, :2]
    np.testing.assert_allclose(wh[:, 0] * wh[:, 1], [32 ** 2] * 12 + [64 ** 2] * 3, rtol=1e-5)
    np.testing.assert_allclose(wh[:, 1] / wh[:, 0], [0.5, 1, 2] * 5, rtol=1e-5)
    per_level = roi.anchors_per_level(64, (32, 64), (32, 64), (0.5, 1.0, 2.0))
    assert [len(a) for a in per_level] == [12, 3]
    np.testing.assert_array_equal(np.concatenate(per_level), anchors)


def test_default_fpn_anchors_count_and_symmetry():
    anchors = roi.fpn_anchors(512)
    assert len(anchors) == 3 * (128 ** 2 + 64 ** 2 + 32 ** 2 + 16 ** 2 + 8 ** 2)
    # half-cell centres: the grid is symmetric about the image centre
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    np.testing.assert_allclose(np.sort(centres[:, 0]), np.sort(1 - centres[:, 0]), atol=1e-6)


@pytest.mark.parametrize("kwargs, key", [({"ratios": (1.0, 0.0)}, "ratios"), ({"sizes": (32,)}, "sizes"),
                                         ({"strides": (4, -8), "sizes": (1, 2)}, "strides"),
                                         ({"input_size": 0}, "input_size")])
def test_anchor_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        roi.fpn_anchors(**{"input_size": 64, "strides": (32, 64), "sizes": (32, 64), **kwargs})


# ---------------------------------------------------------------------------------------------- box coder

def test_encode_by_hand_with_roi_weights():
    anchor = np.array([0, 0, 32, 32], np.float32) / 64  # centre (16, 16) px, 32 x 32
    box = np.array([8, 4, 40, 68], np.float32) / 64  # centre (24, 36) px, 32 x 64
    deltas = roi.encode(box, anchor, roi.ROI_BOX_WEIGHTS).numpy()
    # dx = 10 (24 - 16) / 32, dy = 10 (36 - 16) / 32, dw = 5 log 1, dh = 5 log 2
    np.testing.assert_allclose(deltas, [2.5, 6.25, 0.0, 5 * math.log(2)], atol=1e-5)
    np.testing.assert_allclose(roi.decode(deltas, anchor, roi.ROI_BOX_WEIGHTS).numpy(), box, atol=1e-6)


def test_decode_inverts_encode_and_broadcasts():
    rng = np.random.default_rng(0)
    anchors = roi.fpn_anchors(128, (16, 32), (32, 64))
    centres, sizes = rng.uniform(0, 1, (5, len(anchors), 2)), rng.uniform(0.05, 0.8, (5, len(anchors), 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], -1).astype(np.float32)
    for weights in ((1.0, 1.0, 1.0, 1.0), roi.ROI_BOX_WEIGHTS):
        deltas = roi.encode(boxes, anchors, weights)
        assert deltas.shape == boxes.shape
        assert np.abs(roi.decode(deltas, anchors, weights).numpy() - boxes).max() <= 1e-6


def test_decode_clamps_the_log_size_change():
    anchor = np.array([0.25, 0.25, 0.75, 0.75], np.float32)  # 0.5 x 0.5 centred at 0.5
    box = roi.decode(np.array([0.0, 0.0, 10.0, 1.0], np.float32), anchor).numpy()
    # dw = 10 > log(1000 / 16): the width is 62.5 times the anchor's, dh = 1 stays e
    np.testing.assert_allclose(box, [0.5 - 15.625, 0.5 - 0.25 * math.e, 0.5 + 15.625, 0.5 + 0.25 * math.e],
                               rtol=1e-5)
    box = roi.decode(np.array([0.0, 0.0, 10.0, 10.0], np.float32), anchor, clip=math.log(2)).numpy()
    np.testing.assert_allclose(box, [0, 0, 1, 1], atol=1e-6)


# ---------------------------------------------------------------------------------------------- RoIAlign

def bilinear_reference(feature, y, x):
    """torchvision's ROIAlign bilinear_interpolate, transcribed (feature (H, W, C))."""
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * feature[y_low, x_low] + hy * lx * feature[y_low, x_high]
            + ly * hx * feature[y_high, x_low] + ly * lx * feature[y_high, x_high])


def roi_align_reference(maps, boxes, input_size, output_size=7, sampling_ratio=2, aligned=True,
                        canonical_size=224.0, canonical_level=4, min_level=2):
    """RoIAlign over FPN levels from the definition, with explicit loops (float64)."""
    maps = [np.asarray(m, np.float64) for m in maps]
    boxes = np.asarray(boxes, np.float64)
    n, k = boxes.shape[:2]
    out = np.zeros((n, k, output_size, output_size, maps[0].shape[-1]))
    for b in range(n):
        for r in range(k):
            x1, y1, x2, y2 = boxes[b, r] * input_size
            area = max(x2 - x1, 0) * max(y2 - y1, 0)
            level = math.floor(canonical_level + math.log2(math.sqrt(area) / canonical_size + 1e-8))
            level = min(max(level, min_level), min_level + len(maps) - 1)
            feature, scale = maps[level - min_level][b], 1.0 / 2 ** level
            offset = 0.5 if aligned else 0.0
            x1, y1, x2, y2 = x1 * scale - offset, y1 * scale - offset, x2 * scale - offset, y2 * scale - offset
            roi_w, roi_h = x2 - x1, y2 - y1
            if not aligned:
                roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
            bin_w, bin_h = roi_w / output_size, roi_h / output_size
            for ph in range(output_size):
                for pw in range(output_size):
                    total = 0.0
                    for iy in range(sampling_ratio):
                        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                        for ix in range(sampling_ratio):
                            x = x1 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                            total = total + bilinear_reference(feature, y, x)
                    out[b, r, ph, pw] = total / sampling_ratio ** 2
    return out


def test_level_rule_on_hand_values():
    px = np.array([[0, 0, 224, 224], [0, 0, 112, 112], [100, 50, 548, 498], [0, 0, 111, 111],
                   [10, 10, 12, 12], [5, 5, 5, 5], [0, 0, 512, 512], [0, 0, 56, 224]], np.float32)
    levels = roi.assign_levels(px / 512, 512, min_level=2, max_level=5).numpy()
    # 224 -> 4, 112 -> 3, 448 -> 5, 111 -> 2 (floor of 2.99), tiny and empty -> 2, 512 -> 5 (5.19),
    # 56 x 224 (geometric side 112) -> 3
    np.testing.assert_array_equal(levels, [4, 3, 5, 2, 2, 2, 5, 3])
    np.testing.assert_array_equal(roi.assign_levels(px / 512, 512, min_level=3, max_level=4).numpy(),
                                  [4, 3, 4, 3, 3, 3, 4, 3])


def test_roi_align_of_a_linear_feature_is_the_bin_centre():
    # f(y, x) = x on P2 of a 64 px input: the box [8, 8, 36, 36] px (level 2) covers feature x in
    # [8 / 4 - 0.5, 36 / 4 - 0.5] = [1.5, 8.5], so bin q of 7 has its centre at 2 + q
    p2 = np.broadcast_to(np.arange(16, dtype=np.float32)[None, None, :, None], (1, 16, 16, 1))
    layer = roi.RoIAlign(input_size=64)
    pooled = layer([p2, np.array([[[8, 8, 36, 36]]], np.float32) / 64]).numpy()
    np.testing.assert_allclose(pooled[0, 0, :, :, 0], np.broadcast_to(2.0 + np.arange(7), (7, 7)), atol=1e-5)


@pytest.mark.parametrize("aligned, sampling_ratio, output_size", [(True, 2, 7), (False, 3, 2)])
def test_roi_align_matches_the_reference(aligned, sampling_ratio, output_size):
    rng = np.random.default_rng(1)
    input_size, channels = 256, 5
    maps = [rng.normal(size=(2, 256 // s, 256 // s, channels)).astype(np.float32) for s in (4, 8, 16)]
    px = np.array([[10, 20, 40, 45], [30, 30, 100, 110], [0, 0, 256, 256], [200, 180, 256, 256],
                   [-40, 100, 60, 180], [230, -20, 300, 40], [270, 270, 330, 330], [-80, -80, 50, 50],
                   [50, 60, 50.5, 61], [17.3, 90.1, 150.7, 120.2]], np.float32)
    random_px = np.concatenate([rng.uniform(-20, 200, (10, 2)), np.zeros((10, 2))], 1)
    random_px[:, 2:] = random_px[:, :2] + rng.uniform(4, 180, (10, 2))
    boxes = np.stack([px, random_px.astype(np.float32)]) / input_size  # (2, 10, 4)
    levels = roi.assign_levels(boxes, input_size, 2, 4).numpy()
    assert set(levels.ravel()) == {2, 3, 4}
    layer = roi.RoIAlign(output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned, input_size=input_size)
    got = layer([*maps, boxes]).numpy()
    assert got.shape == (2, 10, output_size, output_size, channels)
    expected = roi_align_reference(maps, boxes, input_size, output_size, sampling_ratio, aligned)
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(expected[0, 6]).max() == 0  # wholly beyond the border: every sample is outside
    assert np.abs(expected[0, 3]).max() > 0


@pytest.mark.parametrize("kwargs, key", [({"output_size": 0}, "output_size"), ({"sampling_ratio": 0}, "adaptive"),
                                         ({"sampling_ratio": -1}, "sampling_ratio"),
                                         ({"input_size": None}, "input_size"), ({"aligned": "yes"}, "aligned"),
                                         ({"canonical_size": 0}, "canonical_size")])
def test_roi_align_config_errors(kwargs, key):
    with pytest.raises(ValueError, match=key):
        roi.RoIAlign(**{"input_size": 64, **kwargs})


def test_roi_align_rejects_feature_maps_that_do_not_fit():
    p2, p3 = keras.Input((16, 16, 8)), keras.Input((8, 8, 4))
    with pytest.raises(ValueError, match="equal channel counts"):
        roi.RoIAlign(input_size=64)([p2, p3, keras.Input((5, 4))])
    with pytest.raises(ValueError, match="static"):
        roi.RoIAlign(input_size=64)([keras.Input((None, None, 8)), keras.Input((5, 4))])
    with pytest.raises(ValueError, match="min_level 3"):  # P2 of a 64 px input given as P3
        roi.RoIAlign(input_size=64, min_level=3)([keras.Input((16, 16, 8)), keras.Input((5, 4))])


# ---------------------------------------------------------------------------------------------- proposals

# input 64, strides (32, 64), sizes (32, 64), one ratio: level 0 anchors [0 0 32 32], [32 0 64 32],
# [0 32 32 64], [32 32 64 64] px, level 1 [0 0 64 64]
PROPOSAL_CONFIG = {"input_size": 64, "strides": (32, 64), "sizes": (32, 64), "ratios": (1.0,)}


def hand_rpn_outputs():
    """Two images. Image 0: anchor 1 moved 30 px left, [2 0 34 32] (logit 5), overlaps anchor 0
    [0 0 32 32] (logit 4) at IoU 30/34; anchor 3 grown to 48 px, [24 24 72 72] (logit 3), crossing
    the border; anchor 2 (logit -1); the level-1 anchor shrunk to 4 px, [30 30 34 34] (logit 6).
    Image 1: the same deltas, logits reversed."""
    deltas = np.zeros((2, 5, 4), np.float32)
    deltas[:, 1, 0] = -30 / 32
    deltas[:, 3, 2:] = math.log(1.5)
    deltas[:, 4, 2:] = math.log(4 / 64)
    logits = np.array([[4, 5, -1, 3, 6], [6, 3, -1, 5, 4]], np.float32)
    return logits, deltas


def test_proposals_nms_clipping_and_min_size_by_hand():
    logits, deltas = hand_rpn_outputs()
    layer = roi.Proposals(**PROPOSAL_CONFIG, pre_nms_topk=3, count=4, min_size=5.0)
    boxes = layer([logits, deltas]).numpy() * 64
    # image 0: level 0 keeps the top 3 (anchors 1, 0, 3); the 4 px box is dropped by min_size;
    # NMS keeps [2 0 34 32] and the clipped [24 24 64 64], drops anchor 0; the rest zero rows
    np.testing.assert_allclose(boxes[0], [[2, 0, 34, 32], [24, 24, 64, 64], [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-4)
    # image 1: top 3 of level 0 are anchors 0 (6), 3 (5), 1 (3): [2 0 34 32] now loses to [0 0 32 32]
    np.testing.assert_allclose(boxes[1], [[0, 0, 32, 32], [24, 24, 64, 64], [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-4)
    # min_size 0 keeps the 4 px box, first by logit in image 0; pre_nms_topk 4 lets anchor 2 in
    boxes, scores, valid = roi.propose(logits, deltas, layer.anchors, 64, pre_nms_topk=4, count=5)
    np.testing.assert_array_equal(valid.numpy(), [4, 4])
    np.testing.assert_allclose(boxes[0].numpy() * 64, [[30, 30, 34, 34], [2, 0, 34, 32], [24, 24, 64, 64],
                                                       [0, 32, 32, 64], [0, 0, 0, 0]], atol=1e-4)
    np.testing.assert_allclose(scores[0].numpy(), [6, 5, 3, -1, 0])


def test_proposals_nms_per_level_or_across_levels():
    # anchor 0 moved to the centre and doubled: [0 0 64 64] px (logit 2), the level-1 anchor the same
    # (logit 1); one candidate per level
    deltas = np.zeros((1, 5, 4), np.float32)
    deltas[0, 0] = [0.5, 0.5, math.log(2), math.log(2)]
    logits = np.array([[2, -5, -5, -5, 1]], np.float32)
    config = {**PROPOSAL_CONFIG, "pre_nms_topk": 1, "count": 2}
    per_level = roi.Proposals(**config)([logits, deltas]).numpy() * 64
    np.testing.assert_allclose(per_level[0], [[0, 0, 64, 64], [0, 0, 64, 64]], atol=1e-4)
    across = roi.Proposals(**config, per_level_nms=False)([logits, deltas]).numpy() * 64
    np.testing.assert_allclose(across[0], [[0, 0, 64, 64], [0, 0, 0, 0]], atol=1e-4)


def test_proposals_stop_the_gradient():
    logits, deltas = (tf.constant(v) for v in hand_rpn_outputs())
    with tf.GradientTape() as tape:
        tape.watch(deltas)
        boxes = roi.Proposals(**PROPOSAL_CONFIG, count=4)([logits, deltas])
    assert tape.gradient(boxes, deltas) is None


@pytest.mark.parametrize("kwargs, key", [({"count": 0}, "count"), ({"pre_nms_topk": 0}, "pre_nms_topk"),
                                         ({"nms_iou": 1.5}, "nms_iou"), ({"min_size": -1}, "min_size"),
                                         ({"ratios": (1.0, -2.0)}, "ratios"), ({"sizes": (32,)}, "sizes")])
def test_proposal_config_errors(kwargs, key):
    with pytest.raises(ValueError, match=key):
        roi.Proposals(**{**PROPOSAL_CONFIG, **kwargs})


def test_proposals_reject_inputs_that_do_not_fit_the_anchors():
    with pytest.raises(ValueError, match=r"\(N, 5\) logits"):
        roi.Proposals(**PROPOSAL_CONFIG)([keras.Input((6,)), keras.Input((6, 4))])


# ---------------------------------------------------------------------------------------------- tiny model

def tiny_two_stage_model():
    """64 px input -> P2 (16 x 16) and P3 (8 x 8) of 8 channels -> RPN outputs -> 20 proposals ->
    3 x 3 RoIAlign (canonical size 32 px, so both levels are used)."""
    image = keras.Input((64, 64, 3), name="image")
    p2 = keras.layers.Conv2D(8, 3, strides=4, padding="same", name="p2")(image)
    p3 = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="p3")(p2)
    logits, deltas = [], []
    for level, feature in ((2, p2), (3, p3)):
        logit = keras.layers.Conv2D(3, 1, name=f"rpn_logits_p{level}")(feature)
        delta = keras.layers.Conv2D(12, 1, name=f"rpn_deltas_p{level}")(feature)
        logits.append(keras.layers.Reshape((-1,))(logit))
        deltas.append(keras.layers.Reshape((-1, 4))(delta))
    logits = keras.layers.Concatenate(axis=1)(logits)
    deltas = keras.layers.Concatenate(axis=1)(deltas)
    proposals = roi.Proposals(input_size=64, strides=(4, 8), sizes=(16, 32), pre_nms_topk=50, count=20,
                              min_size=1.0, name="proposals")([logits, deltas])
    pooled = roi.RoIAlign(output_size=3, input_size=64, canonical_size=32, name="roi_align")([p2, p3, proposals])
    model = keras.Model(image, [proposals, pooled], name="tiny_two_stage")
    rng = np.random.default_rng(3)
    for weight in model.weights:  # small deltas: proposals spread over the image, not all clipped to it
        weight.assign(rng.normal(0, 0.05 if "deltas" in weight.name else 0.5, weight.shape).astype(np.float32))
    return model


def test_tiny_two_stage_model_saves_loads_and_converts_to_builtin_tflite(tmp_path):
    from kprune.export.tflite import convert
    from kprune.models.io import load_model, save_model
    from kprune.models.litert import TFLiteRunner, flatbuffer_graph

    model = tiny_two_stage_model()
    images = np.random.default_rng(4).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    proposals, pooled = (o.numpy() for o in model(images))
    assert proposals.shape == (2, 20, 4) and pooled.shape == (2, 20, 3, 3, 8)
    levels = roi.assign_levels(proposals, 64, 2, 3, canonical_size=32).numpy()
    assert set(levels.ravel()) == {2, 3}

    save_model(model, tmp_path / "tiny.keras")
    loaded = load_model(tmp_path / "tiny.keras")  # safe_mode=True
    for expected, got in zip((proposals, pooled), loaded(images)):
        np.testing.assert_array_equal(got.numpy(), expected)
    assert loaded.get_layer("proposals").get_config() == model.get_layer("proposals").get_config()

    content = convert(model)  # float32, builtin ops only: the converter refuses anything else
    schema, flatbuffer, _ = flatbuffer_graph(content)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [flatbuffer.OperatorCodes(k) for k in range(flatbuffer.OperatorCodesLength())]
    assert not [c.CustomCode() for c in codes if c.CustomCode()]  # no Flex (SELECT_TF_OPS) or custom ops
    ops = {names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())] for c in codes}
    assert {"NON_MAX_SUPPRESSION_V4", "TOPK_V2", "GATHER", "BATCH_MATMUL", "WHILE"} <= ops
    assert not ops & {"CROP_AND_RESIZE", "FLEX_DELEGATE"}
    tflite_proposals, tflite_pooled = TFLiteRunner(content, model)(images)
    assert np.abs(tflite_proposals - proposals).max() <= 1e-4  # in order: the logits have no ties
    assert np.abs(tflite_pooled - pooled).max() <= 1e-4


def test_proposals_hand_case_in_tflite():
    from ai_edge_litert.interpreter import Interpreter

    from kprune.export.tflite import convert

    logits, deltas = hand_rpn_outputs()
    inputs = [keras.Input((5,), name="logits"), keras.Input((5, 4), name="deltas")]
    layer = roi.Proposals(**PROPOSAL_CONFIG, pre_nms_topk=3, count=4, min_size=5.0)
    model = keras.Model(inputs, layer(inputs))
    interpreter = Interpreter(model_content=convert(model))
    interpreter.allocate_tensors()
    by_rank = {len(d["shape"]): d["index"] for d in interpreter.get_input_details()}
    expected = model([logits, deltas]).numpy()
    for image in range(2):  # the min_size drop and the zero rows as in Keras
        interpreter.set_tensor(by_rank[2], logits[image:image + 1])
        interpreter.set_tensor(by_rank[3], deltas[image:image + 1])
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        np.testing.assert_allclose(got[0], expected[image], atol=1e-6)
    np.testing.assert_array_equal(expected[:, 2:], 0)
