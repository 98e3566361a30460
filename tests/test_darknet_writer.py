"""Models back to Darknet: the cfg written from a (pruned) model parses, builds and, with the written
.weights, computes what the model computes; an unpruned conversion reproduces its cfg's sections and
its .weights byte for byte; models without a Darknet cfg are clear errors."""

import numpy as np
import pytest
from click.testing import CliRunner

from kprune import detectors
from kprune._keras import keras
from kprune.cli import main
from kprune.darknet.builder import build_model
from kprune.darknet.cfg import TRAINING_ONLY_KEYS, default_bn_formula, parse_cfg, read_cfg
from kprune.darknet.convert import export_darknet, load_darknet
from kprune.darknet.weights import WeightsHeader, load_weights, save_weights
from kprune.darknet.writer import cfg_path_for, format_cfg, model_cfg, write_cfg
from kprune.models.counting import count_params
from kprune.models.io import load_model, save_model
from kprune.models.layers import DarknetBatchNormalization, DetectionHead
from kprune.prune.structured import prune_filters
from tests.conftest import CFG_DIR, REPO, cfg_path, randomize

# the fork's cfgs beside the repository, else the zoo's copies (test_zoo checks they are the same files)
FORK_DIR = CFG_DIR / "alexeyab" if (CFG_DIR / "alexeyab").is_dir() else REPO / "kprune" / "models" / "cfg"


def _cfg(name: str) -> str:
    return str(FORK_DIR / f"{name}.cfg") if name.startswith(("yolov4", "yolov7")) else cfg_path(name)


def _converted(tmp_path, name, size, width, classes=3, seed=0):
    """The model of ``name`` at ``size`` px and ``width``, converted from a random .weights file."""
    model = build_model(_cfg(name), input_size=size, width=width, classes=classes)
    randomize(model, seed=seed)
    path = tmp_path / f"{name}-random.weights"
    save_weights(model, path, WeightsHeader(0, 2, 5 if name.startswith(("yolov4", "yolov7")) else 0, 64_000))
    converted = build_model(_cfg(name), input_size=size, width=width, classes=classes)
    load_weights(converted, path)
    return converted


def _formula(model) -> str:
    formulas = {layer.formula for layer in model.layers if isinstance(layer, DarknetBatchNormalization)}
    assert len(formulas) == 1
    return formulas.pop()


def _outputs(model, images):
    outputs = model(images, training=False)
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _comparable(section):
    """What a section means to Darknet: its kind, its typed keys with defaults filled in (conv padding
    as the pixels it pads: 1x1 convs pad nothing with pad=0 or pad=1) and the text of its
    training-only keys."""
    params = dict(section.params)
    if section.kind == "convolutional":
        params["pad"] = params["size"] // 2 if params["pad"] else params.pop("padding")
        params.pop("padding", None)
    training = {k: v for k, v in section.raw.items() if k in TRAINING_ONLY_KEYS.get(section.kind, ())}
    return section.kind, params, training


@pytest.mark.parametrize("name, size, width, fork", [
    ("yolov2", 64, 0.125, False),  # reorg, route of two layers, region head
    ("yolov3-tiny", 64, 0.25, False),  # yolo heads, upsample, route of one and two layers, maxpool stride 1
    ("yolov4-tiny", 64, 0.25, True),  # route groups (the CSP split), scale_x_y
    ("yolov7-tiny", 64, 0.25, True),  # many-way routes, SPP max-pools, new_coords heads behind a logistic
])
def test_pruned_model_round_trips_through_darknet_files(tmp_path, name, size, width, fork):
    """convert -> prune 50 % (L1, filter removal) -> export cfg + weights -> parse -> build -> load:
    the same outputs on random images (max abs diff < 1e-5; the same layers in the same order compute
    them)."""
    model = _converted(tmp_path, name, size, width)
    pruned = prune_filters(model, 0.5, "l1").model
    assert count_params(pruned)["params"] < 0.45 * count_params(model)["params"]
    weights = tmp_path / "pruned.weights"
    cfg_file = export_darknet(pruned, weights)
    assert cfg_file == str(tmp_path / "pruned.cfg")

    cfg = read_cfg(cfg_file)
    assert default_bn_formula(cfg) == _formula(pruned) == ("alexeyab" if fork else "original")
    for section in cfg.layers:
        if section.kind == "convolutional":
            assert section["filters"] == pruned.get_layer(f"conv_{section.index}").filters
    rebuilt = build_model(cfg)
    assert load_weights(rebuilt, weights) == WeightsHeader(0, 2, 5 if fork else 0, 64_000)
    assert count_params(rebuilt) == count_params(pruned)
    images = np.random.default_rng(1).random((2, size, size, 3)).astype(np.float32)
    expected, got = _outputs(pruned, images), _outputs(rebuilt, images)
    assert [e.shape for e in expected] == [g.shape for g in got]
    diff = max(float(np.max(np.abs(e - g))) for e, g in zip(expected, got))
    assert diff < 1e-5
    assert max(float(np.max(np.abs(e))) for e in expected) > 1e-3  # outputs that can differ


@pytest.mark.parametrize("name", ["yolov2", "yolov3", "yolov4-tiny", "yolov7-tiny"])
def test_written_cfg_of_a_built_model_has_the_original_sections(name):
    """Graph only: every section has the original kind, typed keys (layer references absolute) and
    training-only keys' text, and [net] has the same keys."""
    original = read_cfg(_cfg(name))
    written = parse_cfg(model_cfg(build_model(original)))
    assert len(written.layers) == len(original.layers)
    for a, b in zip([original.net, *original.layers], [written.net, *written.layers]):
        assert _comparable(b) == _comparable(a), a.where
    assert list(written.net.raw) == list(original.net.raw)


def test_unpruned_conversion_exports_the_same_weights_bytes_and_cfg(tmp_path):
    """A real cfg at its own size and a .weights file of random floats in Darknet's layout: the
    exported .weights is the same file byte for byte, the exported cfg the same sections."""
    rng = np.random.default_rng(5)
    header = WeightsHeader(0, 2, 0, 32_013_312)
    original = tmp_path / "yolov3-tiny.weights"
    original.write_bytes(header.to_bytes() + rng.standard_normal(8_858_734).astype("<f4").tobytes())
    model = load_darknet(_cfg("yolov3-tiny"), original)
    exported = tmp_path / "out.weights"
    export_darknet(model, exported)
    assert exported.read_bytes() == original.read_bytes()
    written, source = read_cfg(tmp_path / "out.cfg"), read_cfg(_cfg("yolov3-tiny"))
    assert [_comparable(s) for s in written.layers] == [_comparable(s) for s in source.layers]
    assert _comparable(written.net) == _comparable(source.net)


def test_saved_model_keeps_the_cfg_text_and_cli_writes_the_pair(tmp_path):
    """The [net] and head texts travel in the .keras file (safe_mode); `kprune darknet export` writes
    OUT.weights and OUT.cfg; a model saved before the texts were stored gets a [net] of its input."""
    model = _converted(tmp_path, "yolov3-tiny", 64, 0.125)
    pruned = prune_filters(model, 0.5, "l1").model
    path = tmp_path / "pruned.keras"
    save_model(pruned, path)
    result = CliRunner().invoke(main, ["darknet", "export", str(path), str(tmp_path / "out.weights")])
    assert result.exit_code == 0, result.output
    assert f"and {tmp_path / 'out.cfg'}" in result.output
    text = (tmp_path / "out.cfg").read_text()
    assert text == model_cfg(pruned) == model_cfg(load_model(path))
    net = parse_cfg(text).net
    assert (net["width"], net["height"], net.raw["max_batches"], net.raw["steps"]) == (64, 64, "500200",
                                                                                        "400000,450000")
    assert parse_cfg(text).layers[16].raw["ignore_thresh"] == ".7"
    assert "pjreddie's Darknet's: it computes the model exactly" in " ".join(text.splitlines()[:4]).replace("# ", "")

    for layer in pruned.layers:
        if isinstance(layer, DetectionHead):
            layer.darknet_options = None
    bare = parse_cfg(model_cfg(pruned))
    assert bare.net.raw == {"width": "64", "height": "64", "channels": "3"}
    assert "ignore_thresh" not in bare.layers[16].raw
    assert [_comparable(s)[:2] for s in bare.layers] == [_comparable(s)[:2] for s in parse_cfg(text).layers]


def test_fork_formula_on_an_original_cfg_is_noted(tmp_path):
    """yolov3-tiny with the fork's batch norm: the cfg says the fork computes it exactly and that kprune
    needs --bn-formula alexeyab to read it back (the cfg has no fork feature that would say so)."""
    model = build_model(_cfg("yolov3-tiny"), input_size=64, width=0.125, bn_formula="alexeyab")
    text = model_cfg(model)
    comment = " ".join(line[2:] for line in text.splitlines() if line.startswith("#"))
    assert "the fork computes it exactly" in comment and "--bn-formula alexeyab" in comment
    assert default_bn_formula(parse_cfg(text)) == "original"


def test_models_without_a_darknet_cfg_are_errors(tmp_path):
    ssd = detectors.build("ssdlite-mobilenetv2", input_size=96, classes=3, width=0.25)
    with pytest.raises(ValueError, match=r"layer \S+ \(\w+\): model 'ssdlite\S*' was not built from a Darknet cfg"):
        export_darknet(ssd, tmp_path / "ssd.weights")
    assert list(tmp_path.iterdir()) == []  # neither file
    s2d = build_model(_cfg("yolov2"), input_size=64, width=0.125, reorg_mode="space_to_depth")
    with pytest.raises(ValueError, match=r"layer reorg_27 \(Reorg\): only a Reorg in mode 'darknet'"):
        write_cfg(s2d, tmp_path / "s2d.cfg")
    assert not (tmp_path / "s2d.cfg").exists()
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv_0")(inputs)
    leaky = keras.Model(inputs, keras.layers.LeakyReLU(alpha=0.2, name="leaky_0")(x))
    with pytest.raises(ValueError, match=r"layer leaky_0 \(LeakyReLU\): is not Darknet's leaky activation"):
        model_cfg(leaky)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv_1")(inputs)  # conv_0 comes after conv_1
    rewired = keras.Model(inputs, keras.layers.Add(name="shortcut_2")([x, keras.layers.Conv2D(8, 1, name="conv_0")(x)]))
    with pytest.raises(ValueError, match=r"layer conv_0 \(Conv2D\): takes the output of layer 1, but a Darknet "
                                         r"\[convolutional\] at index 0 takes the image"):
        model_cfg(rewired)
    with pytest.raises(ValueError, match=r"\[yolo\]: mask=' 1#2' cannot be written"):
        format_cfg([("yolo", [("mask", " 1#2")])])
    assert cfg_path_for("a/b.weights") == "a/b.cfg" and cfg_path_for("c") == "c.cfg"
