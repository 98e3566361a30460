"""The Faster R-CNN FPN family: parameter counts, outputs, save / load, decoding, class-specific NMS,
exact surgery through the shared RPN head and RoIAlign, scopes, new classes, distillation."""

import numpy as np
import pytest

from kprune import detectors
from kprune._keras import keras
from kprune.detectors.rcnn import RCNNFamily
from kprune.models.counting import count_flops, count_params
from kprune.models.head import non_max_suppression
from kprune.models.io import load_model, save_model

RCNN = detectors.get("rcnn")


@pytest.fixture(scope="module")
def small():
    """The small variant at 128 px, half width, 3 classes: C2..C5 of 16, 32, 64, 128 filters, FPN of
    32, box head of 128, K = 128."""
    return RCNN.build("faster-rcnn-small", input_size=128, classes=3, width=0.5)


def _images(model, count=2, seed=0):
    return np.random.default_rng(seed).random((count,) + tuple(model.input_shape[1:])).astype(np.float32)


def test_r50_fpn_counts_and_outputs():
    """41,832,736 parameters with 80 classes. torchvision's fasterrcnn_resnet50_fpn has 41,755,286
    with 91 classes: backbone convs 23,454,912 (no biases, frozen batch norms are buffers), FPN
    laterals (256 + 512 + 1024 + 2048) x 256 + 4 x 256 = 984,064 and outputs 4 x (9 x 256^2 + 256) =
    2,360,320, RPN 590,080 + 771 + 3,084, fc6 12,544 x 1024 + 1024 = 12,846,080, fc7 1,049,600,
    predictors 1025 x 91 and 1025 x 364. Here tf_keras' ResNet-50 adds a bias and four batch-norm
    values per channel (26,560 channels: +132,800; the moving mean and variance, 53,120, are its
    non-trainable weights), 81 logits (-10 x 1025) and 80 x 4 class boxes without background's
    (-44 x 1025): 41,755,286 + 132,800 - 10,250 - 45,100 = 41,832,736."""
    model = RCNN.build("faster-rcnn-r50-fpn")
    counts = count_params(model)
    assert (counts["params"], counts["non_trainable_params"]) == (41_832_736, 53_120)
    # 640 px: levels 160, 80, 40, 20, 10, three anchors per cell
    anchors = 3 * (160 ** 2 + 80 ** 2 + 40 ** 2 + 20 ** 2 + 10 ** 2)
    assert model.output_shape == [(None, anchors), (None, anchors, 4), (None, 1000, 4), (None, 1000, 81),
                                  (None, 1000, 80, 4)]
    backbone = set(RCNN.scopes(model)["fpn"]) | set(layer.name for layer in model.layers
                                                    if layer.name.startswith(("conv", "pool")))
    backbone_params = sum(model.get_layer(n).count_params() for n in backbone)
    assert backbone_params == 23_587_712 + 984_064 + 2_360_320  # ResNet-50 + FPN: 64 % of the model
    assert RCNN.boxes_per_image(model) == 1000 and RCNN.num_classes(model) == 80
    # detectron2's geometry: anchors 32 .. 512 px, RoIAlign's level rule with 224 px on P4
    assert RCNN.head(model).sizes == [32.0, 64.0, 128.0, 256.0, 512.0]
    assert model.get_layer("roi_align").canonical_size == 224.0
    with pytest.raises(ValueError, match="width 1 only"):
        RCNN.build("faster-rcnn-r50-fpn", input_size=64, width=0.5)


def test_small_counts_and_outputs():
    """3,895,817 parameters at width 1 with 5 classes: stem 7 x 7 x 3 x 32 + BN 128; stage 2 two
    blocks of 2 x 9 x 32^2 + 2 BN of 128 (37,376); stage 3 132,352, stage 4 526,848, stage 5
    2,102,272 (the first block of each with a 1x1 projection); FPN (32 + 64 + 128 + 256) x 64 + 256 +
    4 x (9 x 64^2 + 64) = 178,688; RPN 36,928 + 195 + 780; fc1 3136 x 256 + 256, fc2 65,792;
    predictors 257 x 6 and 257 x 20."""
    model = RCNN.build("faster-rcnn-small")
    counts = count_params(model)
    assert (counts["params"], counts["non_trainable_params"]) == (3_895_817, 4_800)
    anchors = 3 * (64 ** 2 + 32 ** 2 + 16 ** 2 + 8 ** 2 + 4 ** 2)
    assert model.output_shape == [(None, anchors), (None, anchors, 4), (None, 128, 4), (None, 128, 6),
                                  (None, 128, 5, 4)]
    # the RPN conv is one layer on five levels: its FLOPs count once per level
    assert len(model.get_layer("rpn_conv")._inbound_nodes) == 5
    levels = 64 ** 2 + 32 ** 2 + 16 ** 2 + 8 ** 2 + 4 ** 2
    rpn = 2 * 9 * 64 * 64 * levels + 2 * 64 * (3 + 12) * levels
    levels_only = keras.Model(model.input, [model.get_layer(name).output for name in RCNN.head(model).features])
    assert count_flops(model) - count_flops(levels_only) == rpn + 128 * 2 * (3136 * 256 + 256 * 256 + 256 * 6 + 256 * 20)


def test_small_anchor_sizes_and_roi_levels_are_scaled_to_its_input():
    """The small variant's anchors: sides 24 .. 384 px on P2..P6, in the head and the proposal layer
    alike; the first anchor (P2, cell (0, 0), ratio h / w = 0.5) centred at (2, 2) px with
    w = 24 / sqrt(0.5), h = 24 x sqrt(0.5); other sizes by argument, five of them or refused.
    RoIAlign pools a box of side 96 (the P4 anchor) from P4: floor(4 + log2(side / 96)) gives sides
    24, 47, 48, 95, 96, 191, 192, 400 px levels 2, 2, 3, 3, 4, 4, 5, 5 (clamped to P5)."""
    from kprune.detectors.rcnn.builders import faster_rcnn_small
    from kprune.models.roi import assign_levels

    model = RCNN.build("faster-rcnn-small", input_size=64, width=0.25)
    assert RCNN.head(model).sizes == [24.0, 48.0, 96.0, 192.0, 384.0]
    assert list(RCNN.proposal_layer(model).sizes) == [24.0, 48.0, 96.0, 192.0, 384.0]
    half_w, half_h = 12 / np.sqrt(0.5), 12 * np.sqrt(0.5)
    np.testing.assert_allclose(RCNN.anchors(model)[0], np.array([2 - half_w, 2 - half_h, 2 + half_w, 2 + half_h]) / 64,
                               atol=1e-6)
    full = faster_rcnn_small(input_size=64, width=0.25, anchor_sizes=(32, 64, 128, 256, 512))
    assert RCNN.head(full).sizes == [32.0, 64.0, 128.0, 256.0, 512.0]
    assert full.count_params() == model.count_params()  # anchors are not weights (zeros differ by chance)
    with pytest.raises(ValueError, match="one positive size"):
        faster_rcnn_small(input_size=64, width=0.25, anchor_sizes=(16, 32))
    align = model.get_layer("roi_align")
    assert align.canonical_size == 96.0 and align.canonical_level == 4
    sides = np.array([24, 47, 48, 95, 96, 191, 192, 400], np.float32) / 512
    boxes = np.stack([0.1 + 0 * sides, 0.1 + 0 * sides, 0.1 + sides, 0.1 + sides], axis=-1)
    levels = assign_levels(boxes, 512, align.min_level, 5, align.canonical_size, align.canonical_level)
    np.testing.assert_array_equal(np.asarray(levels), [2, 2, 3, 3, 4, 4, 5, 5])


def test_bad_sizes_are_refused(small):
    with pytest.raises(ValueError, match="multiple of 32"):
        RCNN.build("faster-rcnn-small", input_size=100)
    with pytest.raises(ValueError, match="fixed to its 128 px input"):
        RCNN.check_input_size(small, 160)
    assert RCNN.check_input_size(small, 128) == 128


def test_save_load_gives_identical_outputs(small, tmp_path):
    path = tmp_path / "rcnn.keras"
    save_model(small, path)
    loaded = load_model(path)  # safe_mode=True
    x = _images(small)
    for a, b in zip(small(x), loaded(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    head = RCNN.head(loaded)
    assert (head.classes, head.proposals, head.box_weights, head.backbone) == (3, 128, [10.0, 10.0, 5.0, 5.0],
                                                                              ["conv5_block2_out"])
    # built-in layers and kprune's registered ones only: nothing that runs stored code
    assert sorted({type(layer).__name__ for layer in loaded.layers}) == [
        "Add", "BatchNormalization", "Concatenate", "Conv2D", "Dense", "InputLayer", "MaxPooling2D", "Proposals",
        "RCNNHead", "ReLU", "Rescaling", "Reshape", "RoIAlign", "UpSampling2D"]
    # trunk pre-training classifies from C5 (stride 32: 4 x 4 at 128 px, 128 filters at half width),
    # found in the loaded model as in the built one
    for model in (small, loaded):
        trunk = RCNN.trunk_output(model)
        assert tuple(trunk.shape) == (None, 4, 4, 128) and trunk.node.layer.name == "conv5_block2_out"


def test_decode_by_hand(small):
    """Proposal 0 (0.1, 0.2, 0.5, 0.6) with zero deltas gives that box for every class; class 1's
    dx = 10 (weight 10) moves it one proposal width right (clipped at 1); background is not a class;
    the padding proposals score 0."""
    count, classes = 128, 3
    proposals = np.zeros((1, count, 4), np.float32)
    proposals[0, 0] = [0.1, 0.2, 0.5, 0.6]
    logits = np.zeros((1, count, classes + 1), np.float32)
    logits[0, 0] = [np.log(4.0), 0.0, np.log(2.0), np.log(3.0)]  # softmax 4/10, 1/10, 2/10, 3/10
    deltas = np.zeros((1, count, classes, 4), np.float32)
    deltas[0, 0, 1] = [10.0, 0.0, 0.0, 0.0]
    deltas[0, 0, 2] = [0.0, 0.0, 5 * np.log(2.0), 0.0]  # twice as wide (ww = 5)
    anchors = len(RCNN.anchors(small))
    outputs = [np.zeros((1, anchors)), np.zeros((1, anchors, 4)), proposals, logits, deltas]
    boxes, scores = RCNN.decode(small, outputs)
    assert boxes.shape == (1, count, classes, 4) and scores.shape == (1, count, classes)
    np.testing.assert_allclose(boxes[0, 0, 0], [0.1, 0.2, 0.5, 0.6], atol=1e-6)
    np.testing.assert_allclose(boxes[0, 0, 1], [0.5, 0.2, 0.9, 0.6], atol=1e-6)
    np.testing.assert_allclose(boxes[0, 0, 2], [0.0, 0.2, 0.7, 0.6], atol=1e-6)  # -0.1 clipped to 0
    np.testing.assert_allclose(scores[0, 0], [0.1, 0.2, 0.3], atol=1e-6)
    assert np.all(scores.numpy()[0, 1:] == 0)
    (kept, kept_scores, kept_classes), = non_max_suppression(boxes, scores, score_threshold=0.15)
    np.testing.assert_allclose(kept_scores, [0.3, 0.2], atol=1e-6)
    assert kept_classes.tolist() == [2, 1]
    np.testing.assert_allclose(kept, [[0.0, 0.2, 0.7, 0.6], [0.5, 0.2, 0.9, 0.6]], atol=1e-6)


def test_class_specific_nms():
    """Boxes (N, B, classes, 4): class 0's two boxes overlap (IoU 0.81) and one goes; class 1's two
    are apart and both stay, though class 1's box of proposal 1 is class 0's box of proposal 0."""
    boxes = np.array([[[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
                       [[0.0, 0.0, 0.45, 0.45], [0.0, 0.0, 0.5, 0.5]]]], np.float32)
    scores = np.array([[[0.9, 0.6], [0.8, 0.7]]], np.float32)
    (kept, kept_scores, kept_classes), = non_max_suppression(boxes, scores, score_threshold=0.1, iou_threshold=0.5)
    np.testing.assert_allclose(kept_scores, [0.9, 0.7, 0.6])
    assert kept_classes.tolist() == [0, 1, 1]
    np.testing.assert_allclose(kept, [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    # the same boxes shared by the classes (N, B, 4): class 1's boxes now overlap too
    (_, shared_scores, _), = non_max_suppression(boxes[:, :, 0], scores, score_threshold=0.1, iou_threshold=0.5)
    np.testing.assert_allclose(shared_scores, [0.9, 0.7])
    with pytest.raises(ValueError, match=r"\(N, B, classes, 4\)"):
        non_max_suppression(np.zeros((1, 2, 3, 4)), scores)


def test_surgery_is_exact_through_the_shared_rpn_and_roi_align():
    """30 % of the filters of every prunable group go; the dense model with those filters zeroed
    computes the same five outputs (to 1e-4 of the largest). The FPN's laterals (tied by the
    top-down additions) and its output convs (tied by RoIAlign and the shared RPN conv) each lose
    the same channels; roi_fc1 loses 49 inputs per removed FPN channel."""
    from tests.test_prune_structured import _assert_matches_silenced, _random_batch_norms
    from kprune.prune.graph import ChannelGraph
    from kprune.prune.structured import prune_filters

    model = RCNN.build("faster-rcnn-small", input_size=128, classes=3, width=0.5)
    graph = ChannelGraph(model)
    assert not graph.unhandled, graph.unhandled
    groups = {g.name: g for g in graph.groups()}
    outputs = groups["fpn_output5+fpn_output2+fpn_output3+fpn_output4"]
    assert len(outputs.units) == 32 and all(len(u.members) == 4 for u in outputs.units)
    assert groups["rpn_objectness_logits"].units == [] and groups["roi_box_deltas"].units == []
    _random_batch_norms(model)
    result = prune_filters(model, 0.3, "l1", "uniform", round_to=1)
    kept = {row["name"]: row["channels_after"] for row in result.layers}
    assert kept["fpn_output2"] == kept["fpn_output5"] == kept["fpn_lateral3"] == kept["rpn_conv"] == 22  # 70 % of 32
    assert kept["roi_fc1"] == 90 and result.model.get_layer("roi_fc1").kernel.shape == (49 * 22, 90)
    assert result.model.get_layer("roi_flatten").output_shape == (None, 128, 49 * 22)
    assert {"rpn_objectness_logits", "roi_class_logits"} <= set(result.protected)
    assert count_params(result.model)["params"] < count_params(model)["params"]
    _assert_matches_silenced(model, result.model, result.history)


def test_scopes_name_the_parts():
    from kprune.prune.scope import SCOPES, layers_in_scope, output_layers

    model = RCNN.build("faster-rcnn-small", input_size=64, classes=2, width=0.25)
    model._name = "renamed"
    assert SCOPES == ("all", "backbone", "head", "fpn", "rpn", "roi_head")
    backbone = layers_in_scope(model, "backbone")
    assert backbone[0] == "conv1_conv" and backbone[-1] == "conv5_block2_2_conv" and len(backbone) == 20
    assert sorted(layers_in_scope(model, "fpn")) == [f"fpn_{kind}{level}" for kind in ("lateral", "output")
                                                     for level in (2, 3, 4, 5)]
    assert layers_in_scope(model, "rpn") == ["rpn_conv"]
    assert layers_in_scope(model, "roi_head") == ["roi_fc1", "roi_fc2"]
    assert sorted(layers_in_scope(model, "roi_head", outputs=True)) == ["roi_box_deltas", "roi_class_logits",
                                                                        "roi_fc1", "roi_fc2"]
    assert layers_in_scope(model, "head") == sorted(layers_in_scope(model, "fpn") + ["rpn_conv", "roi_fc1", "roi_fc2"],
                                                    key=[layer.name for layer in model.layers].index)
    assert sorted(output_layers(model)) == ["roi_box_deltas", "roi_class_logits", "rpn_anchor_deltas",
                                            "rpn_objectness_logits"]
    tiny = detectors.build("yolov2-tiny", input_size=64, width=0.25)
    with pytest.raises(ValueError, match="scope 'rpn' names a part of another detector family"):
        layers_in_scope(tiny, "rpn")


def test_the_family_is_found_from_the_model_and_the_name(small):
    assert isinstance(detectors.family_of(small), RCNNFamily)
    assert detectors.family_for_name("faster-rcnn-r50-fpn") is RCNN
    assert {"faster-rcnn-r50-fpn", "faster-rcnn-small"} <= set(detectors.zoo_names())
    assert RCNN.heads(small) == [small.get_layer("rcnn")]
    metadata = RCNN.export_metadata(small)
    assert metadata["anchors"] == len(RCNN.anchors(small)) == 3 * (32 ** 2 + 16 ** 2 + 8 ** 2 + 4 ** 2 + 2 ** 2)
    assert metadata["box_weights"] == [10.0, 10.0, 5.0, 5.0] and metadata["proposals"] == 128
    with pytest.raises(NotImplementedError, match="TFLite_Detection_PostProcess"):
        RCNN.detection_op_inputs(small, small(_images(small, 1)))


def test_new_classes_replace_only_the_roi_predictors(small):
    fresh = RCNN.replace_classes(small, 2, ["cat", "dog"])
    assert RCNN.num_classes(fresh) == 2 and RCNN.class_names(fresh) == ["cat", "dog"]
    assert fresh.output_shape[3:] == [(None, 128, 3), (None, 128, 2, 4)]
    for name in ("rpn_conv", "rpn_objectness_logits", "roi_fc2", "fpn_output2", "conv1_conv"):
        for a, b in zip(small.get_layer(name).get_weights(), fresh.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    options = RCNN.make_loss_options(small, {"roi_per_image": 64})
    assert options.roi_per_image == 64 and tuple(options.box_weights) == (10.0, 10.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="decodes its box deltas with"):
        RCNN.make_loss_options(small, {"box_weights": [1.0, 1.0, 1.0, 1.0]})


def test_distillation_is_zero_for_equal_outputs(small):
    distill = RCNN.distillation(small)
    outputs = small(_images(small, 1))
    assert float(distill(outputs, outputs)["distill"]) == pytest.approx(0.0, abs=1e-5)
    moved = list(outputs)
    moved[0] = moved[0] + 1.0  # every objectness logit
    moved[3] = moved[3] * 2.0  # the class logits of the same proposals
    assert float(distill(moved, outputs)["distill"]) > 0.01


def test_tfmot_wraps_the_shared_rpn_head(small):
    """The shared RPN conv is wrapped once and still called on the five levels; one-shot magnitude
    pruning then masks half of its kernel."""
    from kprune.models.sparsity import KERNEL_LAYERS, sparsity, strip, wrap
    from kprune.prune.unstructured import make_schedule, prune_now

    names = [layer.name for layer in small.layers if isinstance(layer, KERNEL_LAYERS)]
    wrapped = wrap(small, {name: make_schedule("constant", 0.5) for name in names})
    assert len(wrapped.get_layer("prune_low_magnitude_rpn_conv")._inbound_nodes) == 5
    x = _images(small, 1)
    for a, b in zip(small(x), wrapped(x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert set(RCNN.predictor_convs(wrapped)) == {"prune_low_magnitude_rpn_objectness_logits",
                                                  "prune_low_magnitude_rpn_anchor_deltas",
                                                  "prune_low_magnitude_roi_class_logits",
                                                  "prune_low_magnitude_roi_box_deltas"}
    prune_now(wrapped)
    stripped = strip(wrapped)
    assert sparsity(stripped, ["rpn_conv"])["rpn_conv"] == pytest.approx(0.5, abs=1e-3)
    assert count_flops(stripped) == count_flops(small)


def test_small_variant_trains_through_kprune_train(tiny_synth_data, tmp_path):
    """Two epochs of four steps on the synthetic data at 64 px: every loss term is finite, the loss
    falls, the final model is saved and evaluated."""
    from kprune.train import TrainConfig, TrainingRun

    run = TrainingRun(TrainConfig(dataset=tiny_synth_data, model="faster-rcnn-small", input_size=64, width=0.25,
                                  epochs=2, batch_size=4, lr=2e-3, warmup_epochs=0.5, out=str(tmp_path / "run")),
                      progress=False)
    metrics = run.fit()
    header, *rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    log = [dict(zip(header.split(","), map(float, row.split(",")))) for row in rows]
    assert set(log[0]) >= {"rpn_class", "rpn_box", "roi_class", "roi_box", "val_loss"}
    assert all(np.isfinite(list(entry.values())).all() for entry in log)
    assert log[-1]["loss"] < log[0]["loss"]
    assert metrics["images"] == 8 and 0.0 <= metrics["map50"] <= 1.0
    assert RCNN.num_classes(load_model(tmp_path / "run" / "final.keras")) == 5
