"""The SSD family: architecture figures, default boxes, matching, loss, decoding, pruning, training
and export, with hand-computed expectations."""

import math

import numpy as np
import pytest
from click.testing import CliRunner

from kprune import detectors
from kprune._keras import tf
from kprune.cli import main
from kprune.detectors.ssd.builders import mobilenet_feature_sizes, vgg16_feature_sizes
from kprune.detectors.ssd.loss import MultiBoxLoss, MultiBoxOptions
from kprune.detectors.ssd.priors import decode, encode
from kprune.detectors.ssd.targets import MultiBoxEncoder
from kprune.models.io import load_model, save_model

SSD = detectors.get("ssd")


def cli(*args) -> str:
    """Run ``kprune ARGS`` in process; its output (a failure shows it)."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def ssd300():
    return SSD.build("ssd300-vgg16", classes=20)


def test_ssd300_is_the_original(ssd300):
    assert ssd300.count_params() == 26_285_486  # 20 classes + background, the L2 scale included
    assert SSD.boxes_per_image(ssd300) == 8732
    head = SSD.head(ssd300)
    assert [h for h, _ in head.feature_sizes()] == [38, 19, 10, 5, 3, 1] == vgg16_feature_sizes(300)
    assert head.boxes_per_location() == [4, 6, 6, 6, 4, 4]
    assert ssd300.get_layer("conv4_3_norm").get_weights()[0].tolist() == [20.0] * 512
    assert ssd300.get_layer("fc6").dilation_rate == (6, 6)
    assert ssd300.output_shape == (None, 8732, 4 + 21)
    assert SSD.backbone_boundary(ssd300) == ["fc7"]


def test_ssd300_default_boxes_are_caffes(ssd300):
    anchors = SSD.anchors(ssd300)
    assert anchors.shape == (8732, 4)
    # conv4_3, cell (0, 0): step 8 px, min 30, max 60 px, ratio 2 (w = 30 sqrt 2, h = 30 / sqrt 2)
    centre = 0.5 * 8 / 300
    np.testing.assert_allclose(anchors[0], [centre, centre, 0.1, 0.1], atol=1e-7)
    side = math.sqrt(30 * 60) / 300
    np.testing.assert_allclose(anchors[1], [centre, centre, side, side], atol=1e-7)
    np.testing.assert_allclose(anchors[2], [centre, centre, 0.1 / math.sqrt(2), 0.1 * math.sqrt(2)], atol=1e-7)
    np.testing.assert_allclose(anchors[3], [centre, centre, 0.1 * math.sqrt(2), 0.1 / math.sqrt(2)], atol=1e-7)
    np.testing.assert_allclose(anchors[4, :2], [centre, 1.5 * 8 / 300], atol=1e-7)  # the next column
    # the last map: one cell at the centre, 264 and sqrt(264 * 315) px, not clipped
    np.testing.assert_allclose(anchors[-4], [0.5, 0.5, 0.88, 0.88], atol=1e-7)
    np.testing.assert_allclose(anchors[-3, 2], math.sqrt(264 * 315) / 300, atol=1e-7)
    np.testing.assert_allclose(anchors[-2, 3], 0.88 * math.sqrt(2), atol=1e-6)  # wider than the image
    # fc7 (19 x 19, step 16): 38 * 38 * 4 boxes come first
    np.testing.assert_allclose(anchors[38 * 38 * 4], [8 / 300, 8 / 300, 0.2, 0.2], atol=1e-7)


def test_ssdlite_mobilenetv2_layout():
    model = SSD.build("ssdlite-mobilenetv2", classes=90)
    head = SSD.head(model)
    assert [h for h, _ in head.feature_sizes()] == [20, 10, 5, 3, 2, 1] == mobilenet_feature_sizes(320)
    assert head.boxes_per_location() == [3, 6, 6, 6, 6, 6]
    assert SSD.boxes_per_image(model) == 20 * 20 * 3 + (100 + 25 + 9 + 4 + 1) * 6 == 2034
    anchors = SSD.anchors(model)
    np.testing.assert_allclose(anchors[0], [0.025, 0.025, 0.1, 0.1], atol=1e-7)
    np.testing.assert_allclose(anchors[1200], [0.05, 0.05, 0.35, 0.35], atol=1e-6)  # scale 0.35 on the 10 x 10 map
    np.testing.assert_allclose(anchors[1201, 2], math.sqrt(0.35 * 0.5), atol=1e-6)
    assert model.get_layer("box_0").filters == 12 and model.get_layer("class_5").filters == 6 * 91
    assert SSD.backbone_boundary(model) == ["out_relu"]
    small = SSD.build("ssdlite-mobilenetv2", input_size=96, classes=3, width=0.35)
    assert [h for h, _ in SSD.head(small).feature_sizes()] == [6, 3, 2, 1, 1, 1]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"input size 200: SSD300-VGG16's feature maps would be \[25, 13, 7, 4, 2, 0\]"):
        SSD.build("ssd300-vgg16", input_size=200)
    with pytest.raises(ValueError, match="classes 0: a detector needs at least one class"):
        SSD.build("ssdlite-mobilenetv2", classes=0)
    with pytest.raises(ValueError, match="classes 0"):
        detectors.build("yolov2-tiny", classes=0)
    with pytest.raises(ValueError, match="detector family 'retinanet' does not exist; families: yolo, ssd"):
        detectors.get("retinanet")
    with pytest.raises(ValueError, match="'ssd512' is not a zoo model or a cfg file; zoo models: yolov2, .*ssd300-vgg16"):
        detectors.build("ssd512")
    from kprune._keras import keras

    plain = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3)], name="plain")
    with pytest.raises(ValueError, match="model 'plain' carries no detector-family metadata"):
        detectors.family_of(plain)


def test_save_load_keeps_the_head(tmp_path, ssd300):
    model = SSD.build("ssdlite-mobilenetv2", input_size=128, classes=3, width=0.35, names=["a", "b", "c"])
    save_model(model, tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    assert detectors.family_of(loaded) is SSD and SSD.class_names(loaded) == ["a", "b", "c"]
    np.testing.assert_array_equal(SSD.anchors(loaded), SSD.anchors(model))
    x = np.random.default_rng(0).random((1, 128, 128, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)


def _toy_anchors():
    # (yc, xc, h, w): four quarters of the image and a small central box
    return np.array([[0.25, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5],
                     [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]], np.float32)


def test_matching_by_hand():
    encoder = MultiBoxEncoder(_toy_anchors(), (0.1, 0.2))
    boxes = tf.constant([[[0.0, 0.0, 0.5, 0.4], [0.45, 0.45, 0.6, 0.6], [0, 0, 0, 0]],
                         [[0.9, 0.0, 1.0, 0.05], [0, 0, 0, 0], [0, 0, 0, 0]]])
    labels = tf.constant([[1, 0, -1], [1, -1, -1]])
    ignore = tf.constant([[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.5, 0.5, 1.0]]])
    targets = encoder(boxes, labels, (300, 300), ignore)["multibox"]
    # image 0: box 0 overlaps the top-left quarter by IoU 0.8, box 1 the centre box by 0.5625;
    # image 1: the thin box has IoU 0.02 with the top-right quarter, which it claims anyway as its
    # best; the bottom-left quarter lies inside an ignore region
    assert targets["labels"].numpy().tolist() == [[2, 0, 0, 0, 1], [0, 2, -1, 0, 0]]
    offsets = targets["boxes"].numpy()
    np.testing.assert_allclose(offsets[0, 0], [-1.0, 0.0, 5 * math.log(0.8), 0.0], atol=1e-5)
    np.testing.assert_allclose(offsets[0, 4], [1.25, 1.25, 5 * math.log(0.75), 5 * math.log(0.75)], atol=1e-5)
    np.testing.assert_allclose(offsets[1, 1], [(0.025 - 0.25) / 0.05, (0.95 - 0.75) / 0.05, 5 * math.log(0.1),
                                               5 * math.log(0.2)], atol=1e-5)
    assert not offsets[0, 1:4].any() and not offsets[1, [0, 2, 3, 4]].any()


def test_two_boxes_claiming_one_default_box_the_later_wins():
    encoder = MultiBoxEncoder(_toy_anchors(), (0.1, 0.2))
    boxes = tf.constant([[[0.41, 0.41, 0.59, 0.59], [0.42, 0.42, 0.58, 0.58]]])
    targets = encoder(boxes, tf.constant([[0, 1]]))["multibox"]
    assert targets["labels"].numpy().tolist() == [[0, 0, 0, 0, 2]]


def test_coding_round_trip():
    anchors = tf.constant(_toy_anchors())
    boxes = tf.constant([[0.1, 0.2, 0.3, 0.5], [0.5, 0.5, 0.9, 0.6], [0.0, 0.0, 1.0, 1.0], [0.6, 0.1, 0.7, 0.9],
                         [0.45, 0.4, 0.55, 0.62]])
    np.testing.assert_allclose(decode(encode(boxes, anchors, (0.1, 0.2)), anchors, (0.1, 0.2)).numpy(), boxes.numpy(),
                               atol=1e-6)


def test_multibox_loss_by_hand():
    labels = tf.constant([[2, 0, 0, -1, 0]])
    targets = {"multibox": {"labels": labels, "boxes": tf.constant([[[1.0, 0, -1, 0]] + [[0.0] * 4] * 4])}}
    output = np.zeros((1, 5, 7), np.float32)
    output[0, 0, :4] = [1.5, 0, -1, 2]  # smooth L1: 0.125 + 0 + 0 + 1.5
    output[0, 0, 4:] = [0, 0, 0]  # cross-entropy log 3
    output[0, 1, 4:] = [0, 0, 0]  # background loss log 3
    output[0, 2, 4:] = [2, 0, 0]  # log(1 + 2 e^-2): the easiest negative
    output[0, 3, 4:] = [0, 5, 5]  # ignored: never mined, however wrong
    output[0, 4, 4:] = [0, 1, 1]  # log(1 + 2 e): the hardest negative
    terms = MultiBoxLoss(MultiBoxOptions(neg_pos_ratio=2))(targets, tf.constant(output))
    assert float(terms["localization"]) == pytest.approx(1.625)
    assert float(terms["confidence"]) == pytest.approx(2 * math.log(3) + math.log(1 + 2 * math.e), rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(1.625 + 2 * math.log(3) + math.log(1 + 2 * math.e), rel=1e-6)
    # no positive in the batch: nothing to locate and no negative mined
    empty = {"multibox": {"labels": tf.zeros((1, 5), tf.int32), "boxes": tf.zeros((1, 5, 4))}}
    assert float(MultiBoxLoss()(empty, tf.constant(output))["loss"]) == 0.0


def test_decode_gives_boxes_and_softmax_scores():
    model = SSD.build("ssdlite-mobilenetv2", input_size=64, classes=2, width=0.35)
    anchors = SSD.anchors(model)
    raw = np.zeros((1, len(anchors), 7), np.float32)
    raw[0, :, 4:] = [0.0, math.log(2), math.log(3)]
    boxes, scores = SSD.decode(model, [raw])
    np.testing.assert_allclose(boxes.numpy()[0, 0], [anchors[0, 1] - anchors[0, 3] / 2, anchors[0, 0] - anchors[0, 2] / 2,
                                                     anchors[0, 1] + anchors[0, 3] / 2, anchors[0, 0] + anchors[0, 2] / 2],
                               atol=1e-6)
    np.testing.assert_allclose(scores.numpy()[0, 0], [2 / 6, 3 / 6], atol=1e-6)


def _assert_surgery_equivalent(model, ratio, allocation, criterion, seed=0):
    """Prune filters, silence the same channels in the dense model: outputs agree to 1e-4 relative."""
    from kprune._keras import keras
    from kprune.prune.graph import ChannelGraph
    from kprune.prune.structured import prune_filters
    from kprune.prune.surgeon import silence_channels, units_from_history

    rng = np.random.default_rng(seed)
    for layer in model.layers:  # batch norms far from the identity, so wrong slicing shows
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    graph = ChannelGraph(model)
    assert not graph.unhandled, graph.unhandled
    result = prune_filters(model, ratio, criterion, allocation)
    removed = units_from_history(graph, result.history)
    assert removed
    x = rng.random((2,) + tuple(model.input_shape[1:])).astype(np.float32)
    silence_channels(model, graph, removed)
    dense, pruned = model(x).numpy(), result.model(x).numpy()
    assert dense.shape == pruned.shape
    assert np.max(np.abs(dense - pruned)) <= 1e-4 * np.max(np.abs(dense)), np.max(np.abs(dense - pruned))
    return result


def test_ssd300_surgery_is_exact_through_the_l2_normalisation():
    model = SSD.build("ssd300-vgg16", classes=3, width=0.125)
    result = _assert_surgery_equivalent(model, 0.5, "uniform", "l1")
    kept = {row["name"]: row["channels_after"] for row in result.layers}
    assert kept["conv4_3"] == 32 and result.model.get_layer("conv4_3_norm").get_weights()[0].shape == (32,)
    assert "conv4_3_norm_mbox_conf" in result.protected and "fc7_mbox_loc" in result.protected


@pytest.mark.slow
def test_ssdlite_surgery_is_exact_through_inverted_residuals():
    model = SSD.build("ssdlite-mobilenetv2", input_size=96, classes=3, width=0.5)
    result = _assert_surgery_equivalent(model, 0.3, "global", "l1-normalized")
    assert result.model.count_params() < model.count_params()
    assert "box_0" in result.protected and "class_5" in result.protected


def test_scopes_come_from_the_model_not_its_name():
    from kprune.prune.scope import layers_in_scope, output_layers

    model = SSD.build("ssd300-vgg16", classes=3, width=0.125)
    model._name = "renamed"
    backbone = layers_in_scope(model, "backbone")
    assert backbone == [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)] + \
        ["fc6", "fc7"]
    assert layers_in_scope(model, "head") == [f"conv{n}_{k}" for n in (8, 9, 10, 11) for k in (1, 2)]
    assert len(output_layers(model)) == 12 and all("_mbox_" in name for name in output_layers(model))
    tiny = detectors.build("yolov2-tiny", input_size=64, width=0.25)
    tiny._name = "my-detector"
    assert layers_in_scope(tiny, "backbone") == [f"conv_{i}" for i in range(0, 11, 2)]


@pytest.fixture(scope="module")
def ssdlite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ssdlite") / "ssdlite.keras"
    output = cli("init", "ssdlite-mobilenetv2", path, "--size", "64", "--classes", "5", "--width", "0.35")
    assert output.startswith(f"wrote {path}: ssd model ssdlite-mobilenetv2, 64 px, 5 classes, ")
    return path


def test_info_json_gives_boxes_for_every_family():
    import json

    def info(*args):
        return json.loads(cli("info", *args, "--json"))

    ssd = info("--cfg", "ssd300-vgg16", "--classes", "20")
    assert (ssd["params"], ssd["boxes"], ssd["family"], ssd["classes"]) == (26_285_486, 8732, "ssd", 20)
    assert info("--cfg", "yolov2", "--size", "416")["boxes"] == 13 * 13 * 5 == 845
    assert info("--cfg", "yolov3", "--size", "416")["boxes"] == (13 * 13 + 26 * 26 + 52 * 52) * 3


@pytest.mark.slow
def test_ssdlite_trains_prunes_evaluates_and_exports(ssdlite_file, tiny_synth_data, tmp_path):
    import json

    from kprune.train import TrainConfig, TrainingRun

    run = TrainingRun(TrainConfig(dataset=tiny_synth_data, init=str(ssdlite_file), epochs=2, batch_size=4, lr=2e-3,
                                  warmup_epochs=0.5, out=str(tmp_path / "run")), progress=False)
    metrics = run.fit()
    log = [float(row.split(",")[-1]) for row in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert len(log) == 2 and log[-1] < log[0]  # the validation loss falls
    assert set(metrics) >= {"map50", "coco_map"}
    trained = tmp_path / "run" / "final.keras"

    report = json.loads(cli("prune", trained, "--method", "filters", "--ratio", "0.25", "--allocation", "global",
                            "--out", tmp_path / "pruned.keras", "--json"))
    assert report["params_after"] < report["params_before"]
    # unstructured pruning of an SSD: test_ssd300_trains_prunes_evaluates_and_exports_int8
    scores = json.loads(cli("evaluate", tmp_path / "pruned.keras", "--data", tiny_synth_data, "--json"))
    assert scores["images"] == 8
    cli("detect", trained, str(_image(tmp_path)), "--out", tmp_path / "detected")
    assert (tmp_path / "detected" / "image.jpg").is_file()
    export = json.loads(cli("export", trained, "--quant", "int8", "--data", tiny_synth_data, "--out",
                            tmp_path / "ssd.tflite", "--json"))
    metadata = json.loads((tmp_path / "ssd.json").read_text())
    model = load_model(trained)
    np.testing.assert_allclose(metadata["anchors"], SSD.anchors(model), atol=1e-6)
    assert metadata["variances"] == [0.1, 0.2] and metadata["family"] == "ssd" and len(metadata["classes"]) == 5
    assert metadata["boxes_per_image"] == 4 * 4 * 3 + (4 + 1 + 1 + 1 + 1) * 6  # maps 4, 2, 1, 1, 1, 1 at 64 px
    # A few epochs leave this 0.35-wide MobileNetV2 with extreme batch-norm statistics (after three:
    # gains up to 31, variances down to 1e-8): every layer's int8 error is rounding noise (about 0.25
    # of its scale), but it accumulates, to a mean difference of 0.38 of the mean output after three
    # epochs (0.03 on the trained synthetic baseline). A layer quantized wrong gives a difference as
    # large as the output.
    check = export["check"]
    assert check["mean_abs_diff"] < 0.5 * check["mean_abs_output"]
    tflite = json.loads(cli("evaluate", tmp_path / "ssd.tflite", "--keras", trained, "--data", tiny_synth_data, "--json"))
    assert tflite["images"] == 8


@pytest.mark.slow
def test_ssd300_trains_prunes_evaluates_and_exports_int8(tiny_synth_data, tmp_path):
    """SSD300 (VGG16 at width 0.125, the smallest input it takes) through the same commands as YOLO."""
    import json

    from kprune.train import TrainConfig, TrainingRun

    cli("init", "ssd300-vgg16", tmp_path / "ssd300.keras", "--size", "258", "--classes", "5", "--width", "0.125")
    run = TrainingRun(TrainConfig(dataset=tiny_synth_data, init=str(tmp_path / "ssd300.keras"), epochs=2,
                                  batch_size=4, lr=1e-3, warmup_epochs=0.5, out=str(tmp_path / "run")),
                      progress=False)
    run.fit()
    log = [float(row.split(",")[-1]) for row in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert len(log) == 2 and log[1] < log[0]  # the validation loss falls
    trained = tmp_path / "run" / "final.keras"
    sparse = json.loads(cli("prune", trained, "--method", "global", "--ratio", "0.5", "--scope", "backbone",
                            "--out", tmp_path / "sparse.keras", "--json"))
    assert sparse["params_before"] == sparse["params_after"] == 526_980
    # half of the backbone's 320,152 kernel weights (VGG16 to fc7 at width 0.125) go
    assert sparse["nonzero_params_before"] - sparse["nonzero_params_after"] == 320_152 // 2
    scores = json.loads(cli("evaluate", tmp_path / "sparse.keras", "--data", tiny_synth_data, "--json"))
    assert scores["images"] == 8
    export = json.loads(cli("export", trained, "--quant", "int8", "--data", tiny_synth_data, "--out",
                            tmp_path / "ssd300.tflite", "--json"))
    # conv4_3's normalisation is TFLite's L2_NORMALIZATION: an int8 DIV by the norm failed to run
    from ai_edge_litert.interpreter import Interpreter

    ops = {op["op_name"] for op in Interpreter(str(tmp_path / "ssd300.tflite"))._get_ops_details()}
    assert "L2_NORMALIZATION" in ops and "DIV" not in ops
    check = export["check"]  # measured: mean difference 0.052 against a mean output of 1.40
    assert check["mean_abs_diff"] < 0.1 * check["mean_abs_output"]


def _image(tmp_path):
    import cv2

    path = tmp_path / "image.jpg"
    cv2.imwrite(str(path), np.full((48, 80, 3), 128, np.uint8))
    return path


def test_new_classes_replace_only_the_class_predictors():
    model = SSD.build("ssdlite-mobilenetv2", input_size=64, classes=4, width=0.35)
    fresh = SSD.replace_classes(model, 2, ["cat", "dog"])
    assert SSD.num_classes(fresh) == 2 and SSD.class_names(fresh) == ["cat", "dog"]
    assert fresh.output_shape == (None, 96, 4 + 3)
    assert fresh.get_layer("class_0").filters == 3 * 3 and fresh.get_layer("class_1").filters == 6 * 3
    for name in ("box_0", "box_5", "extra_2", "Conv1"):
        for a, b in zip(model.get_layer(name).get_weights(), fresh.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_anchors_are_refused_for_ssd(tiny_synth_data, tmp_path):
    from kprune.train import TrainConfig, TrainingRun

    config = TrainConfig(dataset=tiny_synth_data, model="ssdlite-mobilenetv2", input_size=64, width=0.35,
                         anchors="kmeans", batch_size=4, out=str(tmp_path))
    with pytest.raises(ValueError, match="anchors = .kmeans.: a model of the ssd family has no anchors to set"):
        TrainingRun(config, progress=False)


def test_l2_normalisation_by_hand():
    from kprune.models.layers import L2Normalization

    layer = L2Normalization(20.0, name="norm")
    x = np.array([[[[3.0, 4.0], [0.0, 0.0]]]], np.float32)  # one row, two positions
    np.testing.assert_allclose(layer(x).numpy(), [[[[12.0, 16.0], [0.0, 0.0]]]], atol=1e-5)
    layer.set_weights([np.array([1.0, 2.0], np.float32)])
    np.testing.assert_allclose(layer(x).numpy(), [[[[0.6, 1.6], [0.0, 0.0]]]], atol=1e-6)
    again = L2Normalization.from_config(layer.get_config())
    assert (again.initial_scale, again.epsilon, again.name) == (20.0, 1e-10, "norm")
