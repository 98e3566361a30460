"""Recovery during retraining: distillation from the dense model (divergences that vanish when the
student equals the teacher, hand-computed values, training with a teacher) and sparsity training
of the batch-norm scales (network slimming)."""

import math

import numpy as np
import pytest

from kprune import detectors
from kprune._keras import tf
from kprune.config import build
from kprune.darknet.builder import build_model
from tests.conftest import cfg_path


def _outputs(model, seed):
    rng = np.random.default_rng(seed)
    shapes = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
    return [tf.constant(rng.normal(0, 2, (2, *s[1:])), tf.float32) for s in shapes]


@pytest.mark.parametrize("name", ["yolov2-tiny", "yolov3-tiny", "ssdlite"])
def test_the_divergence_is_zero_for_the_teacher_itself_and_positive_otherwise(name):
    if name == "ssdlite":
        model = detectors.build("ssdlite-mobilenetv2", input_size=96, classes=3, width=0.35)
    else:
        model = build_model(cfg_path(name), input_size=64, width=0.25, classes=5)
    distill = detectors.family_of(model).distillation(model)
    teacher, student = _outputs(model, 0), _outputs(model, 1)
    assert abs(float(distill(teacher, teacher)["distill"])) < 1e-5
    assert float(distill(student, teacher)["distill"]) > 0.1


def test_yolo_objectness_is_a_bernoulli_kl_and_boxes_count_where_the_teacher_sees_objects():
    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)  # region head, 5 anchors
    distill = detectors.family_of(model).distillation(model)
    teacher = np.zeros((1, 2, 2, 5 * 10), np.float32)  # every objectness 0.5, uniform classes
    student = teacher.copy()
    student[0, 1, 0, 4] = math.log(3.0)  # objectness 0.75 at anchor 0 of one cell
    # KL(0.5 || 0.75) = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.5 ln(4 / 3)
    assert float(distill([student], [teacher])["distill"]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # a raw width 1 off at anchor 2 of another cell: squared error 1, weighted by the teacher's 0.5
    student = teacher.copy()
    student[0, 0, 1, 2 * 10 + 2] = 1.0
    assert float(distill([student], [teacher])["distill"]) == pytest.approx(0.5, rel=1e-5)
    teacher[0, 0, 1, 2 * 10 + 4] = -30.0  # where the teacher sees no object, the box does not count
    student[0, 0, 1, 2 * 10 + 4] = -30.0
    assert float(distill([student], [teacher])["distill"]) < 1e-6


def test_ssd_boxes_are_weighted_by_the_teacher_foreground():
    model = detectors.build("ssdlite-mobilenetv2", input_size=96, classes=3, width=0.35)
    distill = detectors.family_of(model).distillation(model)
    priors = model.output_shape[1]
    teacher = np.zeros((1, priors, 4 + 4), np.float32)  # uniform over background + 3 classes: foreground 0.75
    student = teacher.copy()
    student[0, 7, 1] = 2.0  # smooth L1 of 2 = 1.5
    expected = 0.75 * 1.5 / (0.75 * priors)
    assert float(distill([student], [teacher])["distill"]) == pytest.approx(expected, rel=1e-5)


def test_training_with_a_teacher_and_slimming_adds_both_terms(tmp_path, tiny_synth_data):
    from kprune.models.io import save_model
    from kprune.train import TrainConfig, train_model
    from kprune.train.slimming import gamma_stats
    from tests.conftest import randomize

    teacher = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(teacher, seed=4, scale=0.05)
    save_model(teacher, tmp_path / "teacher.keras")
    for bad, message in (
            ({"distill": {"teacher": "t.keras", "temperature": 2}},
             "distill: unknown key\\(s\\) temperature; known keys: teacher, weight, features, feature_weight"),
            ({"distill": {"teacher": "t.keras", "weight": 0}}, "distill weight = 0"),
            ({"distill": {"weight": 1}}, "distill.teacher = {'weight': 1}: missing"),
            ({"distill": {"teacher": "t.keras", "features": "conv_4"}}, "distill.features = 'conv_4': expected a list"),
            ({"slimming": -0.1}, "slimming = -0.1")):
        with pytest.raises(ValueError, match=message):
            build(TrainConfig, {"dataset": tiny_synth_data, **bad}, "train.yaml")
    student = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    # the batch norms of yolov2-tiny at width 0.25 (at least 8 filters a layer): 8 + 8 + 16 + 32 + 64 +
    # 128 + 256 + 128 channels, scales 1
    assert gamma_stats(student) == {"channels": 640, "median": 1.0, "p10": 1.0, "p90": 1.0, "small": 0.0}
    config = dict(dataset=tiny_synth_data, epochs=3, steps_per_epoch=1, batch_size=4, lr=0.05, warmup_epochs=0,
                  recalibrate_bn=0, seed=0)
    with pytest.raises(ValueError, match="teacher: dense is the unpruned model of a pruning"):
        train_model(student, TrainConfig(**config, distill={"teacher": "dense"}, out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match=r"distill features \['conv_99'\]: not layers of .*its convs: conv_0, conv_2"):
        train_model(student, TrainConfig(**config, distill={"teacher": str(tmp_path / "teacher.keras"),
                                                            "features": ["conv_99"]}, out=str(tmp_path / "c")))
    _, metrics = train_model(student, TrainConfig(**config, distill={"teacher": str(tmp_path / "teacher.keras"),
                                                                     "weight": 2.0, "features": ["conv_4", "conv_8"],
                                                                     "feature_weight": 3.0}, slimming=1.0,
                                                  out=str(tmp_path / "b")), progress=False)
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    header, first = log[0].split(","), log[1].split(",")
    distilled = float(first[header.index("distill")])
    assert distilled > 0  # an untrained student against a random teacher
    # one step in the first epoch, before any update: 1.0 * 640 scales of 1
    slimmed = float(first[header.index("slimming")])
    assert slimmed == pytest.approx(640.0, rel=1e-6)
    imitated = float(first[header.index("imitation")])
    assert 0 < imitated <= 3.0 * 2 * 4  # two layers, each at most 4 (unit attention maps)
    # the training loss is the detection terms plus the distill, imitation and slimming terms
    terms = sum(float(first[header.index(t)]) for t in ("coordinates", "objects", "no_objects", "classes"))
    assert float(first[header.index("loss")]) == pytest.approx(terms + distilled + imitated + slimmed, rel=1e-4)
    # the L1 penalty dominates the scales' gradient: Adam moves each down by about the learning rate
    # per step, 0.05 + 0.0375 + 0.0125 over the three cosine-decayed steps
    before, after = metrics["bn_gamma_before"], metrics["bn_gamma_after"]
    assert before["median"] == 1.0 and after["median"] == pytest.approx(0.9, abs=0.02)


def test_attention_imitation_by_hand_across_widths():
    from kprune.detectors.distill import attention_imitation, attention_map

    # teacher: 4 channels, energy only at the first of two positions; student: 2 channels, equal energy
    teacher = np.zeros((1, 1, 2, 4), np.float32)
    teacher[0, 0, 0] = [1.0, 1.0, 1.0, 1.0]
    student = np.ones((1, 1, 2, 2), np.float32)
    np.testing.assert_allclose(attention_map(teacher).numpy(), [[1.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(attention_map(student).numpy(), [[0.5 ** 0.5, 0.5 ** 0.5]], rtol=1e-6)
    # (1 - 1/sqrt 2)^2 + (1/sqrt 2)^2 = 2 - sqrt 2
    assert float(attention_imitation([student], [teacher])) == pytest.approx(2 - 2 ** 0.5, rel=1e-6)
    assert float(attention_imitation([teacher], [3 * teacher])) == pytest.approx(0.0, abs=1e-7)  # scale-free
