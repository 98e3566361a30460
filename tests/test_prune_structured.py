"""Structured pruning: dependency groups, constraints, history, and exact equivalence with the dense
model whose removed channels are silenced."""

import numpy as np
import pytest

from kprune._keras import keras, tf
from kprune.darknet.builder import build_model
from kprune.models.io import load_model, save_model
from kprune.prune.graph import ChannelGraph
from kprune.prune.structured import prune_filters
from kprune.prune.surgeon import apply_history, remove_units, silence_channels, units_from_history
from kprune.models.counting import count_flops, count_params
from tests.conftest import cfg_path


def _random_batch_norms(model, seed=0):
    """Batch norms that are far from the identity, so that slicing them wrongly shows."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])


def _outputs(model, x):
    return [o.numpy() for o in tf.nest.flatten(model(x, training=False))]


def _assert_matches_silenced(model, pruned, history, seed=0):
    """Silence in ``model`` (in place) the channels ``history`` removed: its outputs and the pruned
    model's agree to 1e-4 of the largest output."""
    graph = ChannelGraph(model)
    removed = units_from_history(graph, history)
    assert removed, "nothing was pruned"
    x = np.random.default_rng(seed).random((2,) + tuple(model.input_shape[1:])).astype(np.float32)
    silence_channels(model, graph, removed)
    for dense, cut in zip(_outputs(model, x), _outputs(pruned, x)):
        assert dense.shape == cut.shape
        assert np.max(np.abs(dense - cut)) <= 1e-4 * np.max(np.abs(dense)), np.max(np.abs(dense - cut))


def _assert_equivalent(model, ratio=0.5, criterion="l1", allocation="uniform", seed=0):
    """Prune, then silence the same channels in the dense model: outputs agree to 1e-4 relative."""
    _random_batch_norms(model, seed)
    result = prune_filters(model, ratio, criterion, allocation)
    _assert_matches_silenced(model, result.model, result.history, seed)
    return result


@pytest.mark.parametrize("name, size, width", [("yolov2", 128, 0.25), ("yolov2-tiny", 96, 0.25), ("yolov3-tiny", 96, 0.25)])
def test_darknet_models_equivalent(name, size, width):
    model = build_model(cfg_path(name), input_size=size, width=width, classes=3)
    result = _assert_equivalent(model)
    heads = [layer for layer in model.layers if layer.name in result.protected]
    assert heads and all(result.model.get_layer(h.name).filters == h.filters for h in heads)


@pytest.mark.slow
@pytest.mark.parametrize("app, size", [("ResNet50", 64), ("VGG16", 32), ("MobileNetV2", 96)])
def test_keras_applications_equivalent(app, size):
    model = getattr(keras.applications, app)(weights=None, input_shape=(size, size, 3), classes=10,
                                              classifier_activation=None)
    result = _assert_equivalent(model, ratio=0.3, allocation="global", criterion="l1-normalized")
    assert count_params(result.model)["params"] < count_params(model)["params"]
    assert result.model.get_layer("predictions").units == 10  # the output never loses outputs


def test_yolov2_reorg_blocks_and_counts():
    """Uniform 50 % of YOLOv2 is YOLOv2 at width 0.5: the same parameters and FLOPs exactly."""
    model = build_model(cfg_path("yolov2"), input_size=416)
    graph = ChannelGraph(model)
    groups = {g.name: g for g in graph.groups()}
    # darknet reorg: conv_26's 64 filters go in aligned blocks of 4, conv_30 (the head) is protected
    assert len(groups["conv_26"].units) == 16 and {u.width for u in groups["conv_26"].units} == {4}
    assert groups["conv_26"].units[1].members == {"conv_26": [4, 5, 6, 7]}
    assert groups["conv_30"].units == [] and groups["conv_30"].protected_units == 425
    result = prune_filters(model, 0.5)
    half = build_model(cfg_path("yolov2"), input_size=416, width=0.5)
    assert count_params(result.model) == {**count_params(half), "nonzero_params": count_params(result.model)["nonzero_params"]}
    assert count_params(result.model)["params"] == 12_865_561  # summed by hand over the 23 convs
    assert count_flops(result.model) == count_flops(half)
    assert result.model.get_layer("conv_29").kernel.shape == (3, 3, 512 + 4 * 32, 512)


def test_space_to_depth_reorg_needs_no_blocks():
    model = build_model(cfg_path("yolov2"), input_size=64, width=0.25, reorg_mode="space_to_depth")
    groups = {g.name: g for g in ChannelGraph(model).groups()}
    assert len(groups["conv_26"].units) == 16 and {u.width for u in groups["conv_26"].units} == {1}
    _assert_equivalent(model, ratio=0.25)


def test_residual_additions_couple_layers():
    model = build_model(cfg_path("yolov3"), input_size=64, width=0.125)
    groups = {g.name: g for g in ChannelGraph(model).groups()}
    # Darknet-53's first stage: conv_1 (the stride-2 conv) and conv_3 are added by shortcut_4
    assert "conv_1+conv_3" in groups
    unit = groups["conv_1+conv_3"].units[0]
    assert unit.members == {"conv_1": [0], "conv_3": [0]}


def test_constraints_round_cap_and_refuse():
    model = build_model(cfg_path("yolov2-tiny"), input_size=64)
    channels = {l["name"]: l["channels_after"] for l in prune_filters(model, 0.3).layers}
    # 16 * 0.7 = 11.2 -> 11 kept -> rounded up to 16; 1024 * 0.7 = 716.8 -> 717 -> 720
    assert channels["conv_0"] == 16 and channels["conv_12"] == 720 and channels["conv_14"] == 425
    capped = prune_filters(model, 0.95, max_ratio=0.9)
    after = {l["name"]: l["channels_after"] for l in capped.layers}
    assert after["conv_0"] == 8 and after["conv_12"] == 104  # 10 % of 1024 = 102.4 -> 103 -> 104
    assert "conv_0" in capped.capped
    odd = {l["name"]: l["channels_after"] for l in prune_filters(model, 0.3, round_to=1).layers}
    assert odd["conv_0"] == 11 and odd["conv_12"] == 717
    with pytest.raises(ValueError, match=r"ratio 1.0: must be in \[0, 1\)"):
        prune_filters(model, 1.0)
    with pytest.raises(ValueError, match="allocation 'greedy': choose one of uniform, independent, global, sensitivity"):
        prune_filters(model, 0.5, allocation="greedy")
    with pytest.raises(ValueError, match="criterion 'l3'"):
        prune_filters(model, 0.5, criterion="l3")
    with pytest.raises(ValueError, match="scope 'nothing_here' matches no prunable layer"):
        prune_filters(model, 0.5, scope="nothing_here")


def test_scope_and_independent_ratios():
    model = build_model(cfg_path("yolov2-tiny"), input_size=64)
    head = {l["name"]: l["channels_after"] for l in prune_filters(model, 0.5, scope="head").layers}
    assert head["conv_0"] == 16 and head["conv_10"] == 512 and head["conv_12"] == 512 and head["conv_13"] == 256
    chosen = prune_filters(model, 0.0, allocation="independent", ratios={"conv_4": 0.5, "conv_1[02]": 0.25})
    after = {l["name"]: l["channels_after"] for l in chosen.layers}
    assert after == {**{l["name"]: l["channels_before"] for l in chosen.layers},
                     "conv_4": 32, "conv_10": 384, "conv_12": 768}


def test_global_l1_ranks_across_layers():
    """Layer conv_2 gets tiny weights: a global L1 ranking takes its filters first."""
    model = build_model(cfg_path("yolov2-tiny"), input_size=64)
    kernel = model.get_layer("conv_2").kernel
    kernel.assign(kernel * 1e-3)
    # 2544 filters in scope: 0.98 % of them is 24.9, closest reachable 25 = 24 (the cap of conv_2) + 1
    result = prune_filters(model, 0.0098, allocation="global", max_ratio=0.75, round_to=1)
    after = {l["name"]: l["channels_after"] for l in result.layers}
    assert after["conv_2"] == 8  # 32 filters, 75 % at most may go
    assert sum(l["channels_before"] - l["channels_after"] for l in result.layers if l["name"] != "conv_2") == 1
    assert result.capped == ["conv_2"]


def test_unknown_layers_protect_their_producers():
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(16, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(16, 3, padding="same", name="b")(a)
    norm = keras.layers.LayerNormalization(name="norm")(b)
    c = keras.layers.Conv2D(16, 1, name="c")(norm)
    soft = keras.layers.Activation("softmax", name="soft")(c)
    d = keras.layers.Conv2D(4, 1, name="d")(soft)
    model = keras.Model(inputs, d)
    graph = ChannelGraph(model)
    assert set(graph.unhandled) == {"norm", "soft"}
    assert graph.protected_producers() == {"b": "feeds norm (LayerNormalization, a layer type the surgeon does not handle)",
                                           "c": "feeds soft (Activation: softmax mixes channels)",
                                           "d": "reaches a model output"}
    result = prune_filters(model, 0.5, round_to=1)
    assert {l["name"]: l["channels_after"] for l in result.layers} == {"a": 8, "b": 16, "c": 16, "d": 4}
    with pytest.raises(ValueError, match="cannot be removed: it feeds norm"):
        remove_units(model, graph, [int(graph.producers["b"][0])])


def test_history_replays_and_composes(tmp_path):
    model = build_model(cfg_path("yolov3-tiny"), input_size=64, width=0.25)
    _random_batch_norms(model)
    first = prune_filters(model, 0.25, round_to=1)
    second = prune_filters(first.model, 0.25, round_to=1, criterion="l2", history=first.history)
    replayed = apply_history(model, second.history)
    x = np.random.default_rng(1).random((1, 64, 64, 3)).astype(np.float32)
    for a, b in zip(_outputs(second.model, x), _outputs(replayed, x)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="layer 'conv_99'"):
        apply_history(model, {"conv_99": [0]})
    with pytest.raises(ValueError, match="conv_0 has 8 filters; index 8 is out of range"):
        apply_history(model, {"conv_0": [8]})


def test_history_may_not_split_coupled_channels():
    model = build_model(cfg_path("yolov2"), input_size=64, width=0.25)
    with pytest.raises(ValueError, match="split channels that must be removed together"):
        apply_history(model, {"conv_26": [0, 1, 2, 4, 5, 6, 7]})


def test_pruned_model_saves_and_converts(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model = build_model(cfg_path("yolov2"), input_size=96, width=0.25, classes=2)
    _random_batch_norms(model)
    pruned = prune_filters(model, 0.5).model
    path = tmp_path / "pruned.keras"
    save_model(pruned, path)
    loaded = load_model(path)
    x = np.random.default_rng(2).random((1, 96, 96, 3)).astype(np.float32)
    expected = _outputs(pruned, x)
    np.testing.assert_array_equal(expected[0], _outputs(loaded, x)[0])
    interpreter = Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(loaded).convert())
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert np.max(np.abs(got - expected[0])) <= 1e-4 * max(1.0, np.max(np.abs(expected[0])))
