"""The criteria registry, and the data-driven Taylor criterion against hand-computed scores."""

import numpy as np
import pytest
from click.testing import CliRunner

from kprune._keras import keras, tf
from kprune.prune.importance import CRITERIA, filter_scores, get_criterion


def test_the_registry_names_and_describes_every_criterion():
    assert list(CRITERIA) == ["l1", "l2", "bn-gamma", "l1-normalized", "taylor"]
    assert [name for name, c in CRITERIA.items() if c.needs_data] == ["taylor"]
    assert all(c.description() for c in CRITERIA.values())
    with pytest.raises(ValueError, match="criterion 'l3': choose one of l1, l2, bn-gamma, l1-normalized, taylor"):
        get_criterion("l3")


class _Sum:
    """Loss = the sum of the outputs, on two batches of one 2x2 image: all ones, then all 0.5."""

    def batches(self, model):
        yield np.ones((1, 2, 2, 1), np.float32), None
        yield np.full((1, 2, 2, 1), 0.5, np.float32), None

    def loss(self, model):
        return lambda targets, outputs: {"loss": tf.reduce_sum(outputs)}


def test_taylor_scores_are_the_squared_gradient_times_weight():
    inputs = keras.Input((2, 2, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, use_bias=False, name="c")(inputs))
    model.get_layer("c").set_weights([np.array([1.0, 2.0, -1.0], np.float32).reshape(1, 1, 1, 3)])
    # d(sum of outputs)/dw_k = the sum of the input (4, then 2): g * w = 4 w, then 2 w; squared and
    # averaged over the two batches: (16 w^2 + 4 w^2) / 2 = 10 w^2
    scores = filter_scores(model, ["c"], "taylor", _Sum())
    np.testing.assert_allclose(scores["c"], [10.0, 40.0, 10.0], rtol=1e-6)
    with pytest.raises(ValueError, match="criterion taylor scores filters on training data"):
        filter_scores(model, ["c"], "taylor")


def test_taylor_prunes_a_detector_on_its_training_data(tmp_path, tiny_synth_data):
    from kprune.cli import main
    from kprune.darknet.builder import build_model
    from kprune.models.io import save_model
    from kprune.prune.sample import DetectionSample
    from tests.conftest import cfg_path, randomize

    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=3, scale=0.05)
    save_model(model, tmp_path / "m.keras")
    sample = DetectionSample(tiny_synth_data, batches_per_score=2, batch_size=4)
    first = filter_scores(model, ["conv_0", "conv_4"], "taylor", sample)
    assert first["conv_4"].shape == (16,) and np.all(first["conv_4"] >= 0) and first["conv_4"].max() > 0
    # the same batches on every call: the scores are reproducible
    np.testing.assert_array_equal(filter_scores(model, ["conv_4"], "taylor", sample)["conv_4"], first["conv_4"])
    runner = CliRunner()
    args = ["prune", str(tmp_path / "m.keras"), "--method", "filters", "--criterion", "taylor", "--ratio", "0.5",
            "--out", str(tmp_path / "p.keras"), "--json"]
    refused = runner.invoke(main, args)
    assert refused.exit_code != 0 and "criterion taylor scores filters on training data: give --data" in refused.output
    result = runner.invoke(main, args + ["--data", tiny_synth_data])
    assert result.exit_code == 0, result.output
    assert "conv_4" in result.output and '"criterion": "taylor"' in result.output


def test_the_readme_table_is_the_registry():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("<!-- criteria table")[1].split("\n\n")[0]  # from the marker to the blank line
    rows = [line.strip() for line in table.splitlines() if line.strip().startswith("| `")]
    expected = [f"| `{name}` | {'yes' if c.needs_data else 'no'} | {c.description().replace('|', chr(92) + '|')} |"
                for name, c in CRITERIA.items()]
    assert rows == expected
