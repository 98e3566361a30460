"""Reconstruction after filter pruning: least squares re-fits the convs that lost inputs."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kprune._keras import keras
from kprune.prune.reconstruct import reconstruct
from kprune.prune.structured import prune_filters


def _model():
    # c1's filters 8..15 are 0.1 x filters 0..7, so after the ReLU their channels are 0.1 x those:
    # L1 pruning removes them, and c2 can take their part back exactly (w_k + 0.1 w_{k+8} on channel k)
    x = inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(16, 3, padding="same", name="c1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="out")(keras.layers.ReLU(name="r2")(x)))
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (3, 3, 4, 8)).astype(np.float32)
    bias = rng.normal(0, 0.1, 8).astype(np.float32)
    model.get_layer("c1").set_weights([np.concatenate([kernel, 0.1 * kernel], -1), np.concatenate([bias, 0.1 * bias])])
    return model


def _images(count=2, seed=1):
    rng = np.random.default_rng(seed)
    return lambda: (rng.normal(0, 1, (4, 8, 8, 4)).astype(np.float32) for _ in range(count))


def test_a_conv_that_lost_redundant_inputs_is_refit_exactly():
    dense = _model()
    result = prune_filters(dense, 0.5, "l1", "uniform", scope="c1", round_to=1)
    assert result.history["c1"] == list(range(8))  # the scaled copies went
    images = np.random.default_rng(5).normal(0, 1, (8, 8, 8, 4)).astype(np.float32)
    before = np.abs(result.model(images).numpy() - dense(images).numpy()).max()
    (row,) = reconstruct(dense, result.model, result.history, _images(), ridge=1e-9)
    # 2 batches of 4 images, all 64 positions of each; the fifth image is held out: 7 x 64 rows fitted
    assert row["name"] == "c2" and row["rows"] == 448
    assert row["error_before"] > 0.005 and row["error_after"] < 1e-9
    # the re-fit conv gives the dense model's outputs on new images
    after = np.abs(result.model(images).numpy() - dense(images).numpy()).max()
    assert before > 0.1 and after < 1e-4


def test_the_command_line_reconstructs_a_detector(tmp_path, tiny_synth_data):
    from kprune.cli import main
    from kprune.darknet.builder import build_model
    from kprune.models.io import save_model
    from tests.conftest import cfg_path, randomize

    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=3, scale=0.05)
    save_model(model, tmp_path / "m.keras")
    args = ["prune", str(tmp_path / "m.keras"), "--method", "filters", "--ratio", "0.5", "--reconstruct",
            "--out", str(tmp_path / "p.keras"), "--json"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "give --data" in refused.output
    result = CliRunner().invoke(main, args + ["--data", tiny_synth_data])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["reconstruction"]
    # the convs after a pruned one (conv_0 and conv_2 have 8 filters at width 0.25 and keep them, a
    # multiple of 8; conv_4 is the first to lose filters), the output conv conv_14 included
    assert [r["name"] for r in rows] == ["conv_6", "conv_8", "conv_10", "conv_12", "conv_13", "conv_14"]
    # 16 training images, the 5th, 10th and 15th held out: the 64 positions of conv_6's 8 x 8 map in 13
    assert rows[0]["rows"] == 13 * 64
    assert all(r["error_after"] < r["error_before"] for r in rows)
    with pytest.raises(ValueError, match="not method filters, schedule gradual"):
        from kprune.prune.command import check_options
        check_options("filters", 0.5, schedule="gradual", data="d", epochs=1, reconstruct=True)
