"""Structured pruning of the AlexeyAB fork's models: the channel split of ``[route] groups``, mish,
swish, activated shortcuts, SPP max-pools and many-way concatenations, their backbone boundaries,
and `kprune prune` on YOLOv4-tiny."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kprune import detectors
from kprune._keras import keras
from kprune.cli import main
from kprune.darknet.builder import build_model
from kprune.models.counting import count_params
from kprune.models.io import load_model, save_model
from kprune.models.layers import ChannelSlice
from kprune.prune.graph import ChannelGraph, SliceHandler
from kprune.prune.plan import prunable_channels
from kprune.prune.scope import layers_in_scope
from kprune.prune.structured import prune_filters
from kprune.prune.surgeon import apply_history
from tests.conftest import randomize
from tests.test_prune_structured import _assert_equivalent, _assert_matches_silenced, _random_batch_norms


def _build(name, size=64, width=0.25, classes=3):
    return detectors.build(name, input_size=size, classes=classes, width=width)


@pytest.mark.parametrize("name, width, slices", [
    ("yolov4-tiny", 0.25, 3), ("yolov7-tiny", 0.25, 0), ("yolov4", 0.125, 0), ("yolov4-csp", 0.125, 0),
    ("yolov7", 0.125, 0)])
def test_fork_models_equivalent(name, width, slices):
    """Half the filters of every group go; the pruned model computes what the dense one computes
    with those filters silenced (within 1e-4 of the largest output), at 64 px."""
    model = _build(name, width=width)
    result = _assert_equivalent(model)
    assert result.unhandled == {}
    heads = [layer for layer in model.layers if layer.name in result.protected]
    assert len(heads) == (2 if name == "yolov4-tiny" else 3)
    assert all(result.model.get_layer(h.name).filters == h.filters == 24 for h in heads)  # 3 x (5 + 3)
    cut = [layer for layer in result.model.layers if isinstance(layer, ChannelSlice)]
    assert len(cut) == slices
    for layer in cut:  # each slice halves its (pruned) input
        assert layer.output_shape[-1] * 2 == layer.input_shape[-1] == model.get_layer(layer.name).input_shape[-1] // 2


def test_global_allocation_on_yolov7_tiny_equivalent():
    """Global ranking prunes groups unevenly: the many-way concatenations still line up."""
    model = _build("yolov7-tiny")
    result = _assert_equivalent(model, ratio=0.4, allocation="global", criterion="l1-normalized", seed=1)
    assert prunable_channels(ChannelGraph(model)) == 1848  # the 3 head convs' 72 filters are protected
    removed = sum(row["channels_before"] - row["channels_after"] for row in result.layers)
    assert removed == 736  # 0.4 x 1848 = 739.2, groups rounded to multiples of 8
    pairs = {(row["channels_before"], row["channels_after"]) for row in result.layers}
    assert {(32, 24), (64, 40)} <= pairs  # not the uniform halving


def test_split_ties_the_slices():
    """yolov4-tiny's route 3 takes slice 1 of 2 of conv_2: channel k and channel k + C/2 of conv_2
    form one unit, so both slices lose the same positions."""
    model = _build("yolov4-tiny")
    groups = {g.name: g for g in ChannelGraph(model).groups()}
    assert [u.members for u in groups["conv_2"].units] == [{"conv_2": [k, k + 8]} for k in range(8)]
    assert [u.members for u in groups["conv_18"].units][5] == {"conv_18": [5, 37]}
    assert groups["conv_1"].units[0].members == {"conv_1": [0]}  # not split: one channel per unit

    _random_batch_norms(model)
    kept = [0, 2, 5, 8, 10, 13]  # positions 0, 2, 5 of both slices
    pruned = apply_history(model, {"conv_2": kept})
    assert pruned.get_layer("route_3").output_shape[-1] == 3 and pruned.get_layer("route_8").output_shape[-1] == 6 + 16
    _assert_matches_silenced(model, pruned, {"conv_2": kept}, seed=3)

    with pytest.raises(ValueError, match="channels kept in layer conv_2 split channels that must be removed together"):
        apply_history(model, {"conv_2": [0, 1, 2, 8, 9]})  # 3 of slice 0, 2 of slice 1


def test_split_of_an_odd_count_is_refused():
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(6, 3, padding="same", name="c")(inputs)
    split = ChannelSlice(2, 1, name="split")
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="d")(split(conv)))
    graph = ChannelGraph(model)
    assert [u.members for u in graph.groups()[0].units] == [{"c": [k, k + 3]} for k in range(3)]
    with pytest.raises(ValueError, match="layer split: 5 channels do not split into groups=2 equal slices"):
        SliceHandler().propagate(split, [np.arange(5)], graph)


_SPLIT_AND_SHORTCUT = """
[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=mish

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=swish

[route]
layers=-1,-2
groups=2
group_id=1

[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky

[shortcut]
from=-3
activation=mish

[convolutional]
filters=4
size=1
stride=1
pad=1
activation=linear
"""


def test_split_of_two_routes_and_a_shortcut(tmp_path):
    """A route that slices two layers (route_2_slice_0 / _1, then a concatenation), and an
    activated shortcut adding the second of them to a conv: the split ties conv_1's channels k and
    k + 4, the shortcut ties conv_1 and conv_3, so their units hold 2 channels of each."""
    path = tmp_path / "split.cfg"
    path.write_text(_SPLIT_AND_SHORTCUT)
    model = build_model(path)
    groups = {g.name: g for g in ChannelGraph(model).groups()}
    assert [u.members for u in groups["conv_0"].units] == [{"conv_0": [k, k + 8]} for k in range(8)]
    assert [u.members for u in groups["conv_1+conv_3"].units] == [
        {"conv_1": [k, k + 4], "conv_3": [k, k + 4]} for k in range(4)]
    _random_batch_norms(model)
    result = prune_filters(model, 0.5, round_to=1)
    after = {row["name"]: row["channels_after"] for row in result.layers}
    assert after == {"conv_0": 8, "conv_1": 4, "conv_3": 4, "conv_5": 4}
    assert result.model.get_layer("route_2").output_shape[-1] == 2 + 4  # slice 1 of conv_1 and of conv_0
    _assert_matches_silenced(model, result.model, result.history)


#: model -> (index of the last backbone layer, backbone convs, head convs without the output convs)
BOUNDARIES = {
    "yolov4-tiny": (26, 15, 4),
    "yolov7-tiny": (32, 22, 33),
    "yolov4": (104, 72, 35),
    "yolov4-csp": (98, 68, 44),
    "yolov7": (57, 41, 48),
}


@pytest.mark.parametrize("name", list(BOUNDARIES))
def test_backbone_and_head_split_at_the_trunk_end(name):
    end, backbone_convs, head_convs = BOUNDARIES[name]
    model = _build(name, width=0.125)
    backbone, head = layers_in_scope(model, "backbone"), layers_in_scope(model, "head")
    assert (len(backbone), len(head)) == (backbone_convs, head_convs)
    index = {n: int(n.split("_")[1]) for n in backbone + head}
    assert max(index[n] for n in backbone) == end and min(index[n] for n in head) > end
    assert f"conv_{end}" in backbone  # every one of these trunks ends with a conv


def test_prune_yolov4_tiny_with_the_cli(tmp_path):
    """`kprune prune --method filters --ratio 0.5` on YOLOv4-tiny at width 0.25: uniform halving with
    channels rounded to 8 is the same network as width 0.125 (the pruned cfg)."""
    model = _build("yolov4-tiny")
    randomize(model, seed=4, scale=0.1)
    dense, out = tmp_path / "dense.keras", tmp_path / "pruned.keras"
    save_model(model, dense)
    result = CliRunner().invoke(main, ["prune", str(dense), "--method", "filters", "--ratio", "0.5", "--out", str(out),
                                       "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    pruned = load_model(out)
    # summed by hand over the 21 convs of the width-0.125 cfg, kernels + 4 batch-norm values per
    # filter (biases for the 2 head convs): 248 + 608 + 608 + 320 + 608 + 160 + 2368 + 608 + 608
    # + 320 + 9344 + 2368 + 2368 + 1152 + 37120 + 2176 + 18688 + 1560 + 576 + 13952 + 792
    assert report["params_after"] == count_params(pruned)["params"] == 96_552
    assert count_params(_build("yolov4-tiny", width=0.125))["params"] == 96_552
    assert report["params_before"] == count_params(model)["params"] == 373_800
    assert pruned.get_layer("route_3").output_shape[-1] == 4 and pruned.get_layer("conv_2").filters == 8

    _assert_matches_silenced(model, pruned, json.loads((tmp_path / "pruned.history.json").read_text()))
