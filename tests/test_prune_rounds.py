"""Pruning in rounds: the cubic schedule, gradual global and iterative stopping on an mAP drop."""

import numpy as np
import pytest

from kprune.darknet.builder import build_model
from kprune.prune.graph import ChannelGraph
from kprune.prune.rounds import prune_in_rounds
from kprune.prune.schedules import cubic_targets, linear_targets
from kprune.prune.plan import prunable_channels
from kprune.prune.surgeon import apply_history
from kprune.models.counting import count_params
from tests.conftest import cfg_path, randomize


@pytest.fixture(scope="module")
def dense():
    model = build_model(cfg_path("yolov2"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=5, scale=0.05)
    return model


def _identity(maps=None):
    """A fine-tuning stand-in: the model unchanged and a scripted mAP per round."""
    calls = []

    def finetune(model, t):
        calls.append(t)
        return model, {"map50": maps[t - 1] if maps else 0.5}

    return finetune, calls


def test_cubic_targets_by_hand():
    # s_t = 0.75 + (0 - 0.75)(1 - t/4)^3
    assert cubic_targets(0.75, 4) == pytest.approx([0.43359375, 0.65625, 0.73828125, 0.75])
    assert cubic_targets(0.5, 2, initial=0.1) == pytest.approx([0.45, 0.5])  # 0.5 - 0.4 / 8
    assert linear_targets(0.3, 10) == pytest.approx([0.3, 0.6, 0.9])
    for bad in [(0.5, 0), (1.0, 3), (-0.1, 3)]:
        with pytest.raises(ValueError):
            cubic_targets(*bad)
    with pytest.raises(ValueError, match="step 0: "):
        linear_targets(0, 3)


def test_gradual_global_follows_the_schedule(dense):
    finetune, calls = _identity()
    targets = cubic_targets(0.5, 3)
    result = prune_in_rounds(dense, targets, finetune, round_to=8)
    assert calls == [1, 2, 3] and not result.stopped
    total = prunable_channels(ChannelGraph(dense))
    removed = [r["removed"] for r in result.rounds]
    assert removed == sorted(removed)
    for r in result.rounds:
        # one unit of 8 channels (the rounding step) is the largest a layer can miss its share by
        assert abs(r["removed"] - r["target"]) <= 8 * 23 / total
    assert removed[-1] == pytest.approx(0.5, abs=0.03)
    # the history refers to the dense model: replaying it gives the final model
    replayed = apply_history(dense, result.history)
    assert count_params(replayed) == count_params(result.model)
    x = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(replayed(x).numpy(), result.model(x).numpy(), atol=1e-5)
    assert {row["name"]: row["channels_after"] for row in result.layers} == {
        name: len(ids) for name, ids in ChannelGraph(result.model).producers.items()}


def test_max_ratio_caps_against_the_original_width(dense):
    finetune, _ = _identity()
    result = prune_in_rounds(dense, [0.6, 0.8, 0.85, 0.9], finetune, allocation="uniform", round_to=1, max_ratio=0.5)
    before = {row["name"]: row["channels_before"] for row in result.layers}
    for row in result.layers:
        if row["name"] != "conv_30":  # the output conv keeps its outputs
            assert row["channels_after"] == pytest.approx(before[row["name"]] / 2, abs=0.5), row
    assert result.rounds[-1]["capped"]


def test_iterative_stops_before_the_drop(dense):
    finetune, calls = _identity(maps=[0.70, 0.69, 0.66, 0.60])
    result = prune_in_rounds(dense, linear_targets(0.2, 4), finetune, allocation="uniform",
                             baseline_map=0.70, max_drop=0.02)
    assert calls == [1, 2, 3]  # round 3 drops 0.04 > 0.02: stop there
    assert "round 3" in result.stopped and "round 2 is kept" in result.stopped
    assert count_params(result.model)["params"] == result.rounds[1]["params"] < result.rounds[0]["params"]
    assert result.metrics == {"map50": 0.69}
    assert count_params(apply_history(dense, result.history)) == count_params(result.model)


def test_iterative_first_round_too_costly_keeps_the_dense_model(dense):
    finetune, _ = _identity(maps=[0.5])
    result = prune_in_rounds(dense, [0.2], finetune, allocation="uniform", baseline_map=0.7, max_drop=0.02)
    assert result.model is dense and result.history == {} and result.metrics == {}


def test_bad_round_arguments(dense):
    finetune, _ = _identity()
    with pytest.raises(ValueError, match="non-decreasing"):
        prune_in_rounds(dense, [0.5, 0.3], finetune)
    with pytest.raises(ValueError, match="in rounds: choose one of uniform, global"):
        prune_in_rounds(dense, [0.5], finetune, allocation="independent")
    with pytest.raises(ValueError, match="both max_drop and baseline_map"):
        prune_in_rounds(dense, [0.5], finetune, max_drop=0.02)
