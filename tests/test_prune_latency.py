"""Latency budgets: per-layer tables, the predicted latency, the search and its correction, on a
stand-in runtime whose times are a known function of the FLOPs (the real runtimes are measured by
``make bench``, never timed in tests)."""

import json

import numpy as np
import pytest

from kprune._keras import keras
from kprune.models.counting import layer_flops
from kprune.prune.command import prune
from kprune.prune.latency import LatencyTable, single_layer, timed_layers
from tests.test_prune_budgets import _model, flops


@pytest.fixture(autouse=True)
def cache_here(tmp_path, monkeypatch):
    """The latency cache in the test's folder, not the user's."""
    monkeypatch.setenv("KPRUNE_CACHE", str(tmp_path / "cache"))


class Clock:
    """A runtime whose batch-1 time is 1 ms per 10,000 FLOPs of the convs plus 0.5 ms per model."""

    key = "clock-1t"

    def __init__(self):
        self.timed = []

    def time(self, models):
        self.timed.extend(models)
        return {name: sum(layer_flops(layer) for layer in timed_layers(model)) / 1e4 + 0.5
                for name, model in models.items()}


def test_a_single_layer_model_keeps_the_layer_but_its_channels():
    layer = _model().get_layer("c2")
    alone = single_layer(layer, 12, 5)
    conv = alone.layers[-1]
    assert (alone.input_shape, conv.filters, conv.kernel_size, conv.padding) == ((1, 8, 8, 12), 5, (3, 3), "same")
    assert layer_flops(conv) == 2 * 64 * 9 * 12 * 5


def test_the_table_predicts_what_the_runtime_measures_and_is_cached(tmp_path):
    model, clock, cache = _model(), Clock(), tmp_path / "latency.json"
    table = LatencyTable.measure(model, clock, cache, progress=False)
    # grids: c1 in {1, 2, 3} x out {4, 8, 12, 16}, c2 and out's inputs {4, 8, 12, 16}, out's outputs {1, 2, 3, 4}
    assert table.measured == 12 + 16 + 16 and table.cached == 0
    assert table.dense_ms == pytest.approx(flops(16, 16) / 1e4 + 0.5) == pytest.approx(36.34)
    # three single-layer models each carry the 0.5 ms overhead: the rest of the model is -1 ms
    assert table.rest_ms == pytest.approx(-1.0)
    for k1, k2 in [(16, 16), (11, 11), (16, 6), (5, 13)]:  # bilinear interpolation is exact for conv FLOPs
        x = inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(k1, 3, padding="same", name="c1")(x)
        x = keras.layers.Conv2D(k2, 3, padding="same", name="c2")(x)
        pruned = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="out")(x))
        assert table.predict(pruned) == pytest.approx(flops(k1, k2) / 1e4 + 0.5)
    stored = json.loads(cache.read_text())
    assert len(next(iter(stored.values()))) == 44
    again = LatencyTable.measure(model, clock, cache, progress=False)
    assert (again.measured, again.cached) == (0, 44) and clock.timed[-1] == "dense"  # only the model itself


def test_a_latency_target_is_met_within_five_percent_after_a_correction(tmp_path):
    clock = Clock()
    pruned, report, _ = prune(_model(), "filters", target_latency=18.0, allocation="uniform", round_to=1,
                              runtime=clock)
    latency = report["latency"]
    # uniform widths step coarsely: 10 kept predicts 15.99 ms (11 % under the target), so the goal is
    # scaled by 18 / 15.99 and the search lands on 11 kept: 18.80 ms, 4.5 % over
    assert [a["measured_ms"] for a in latency["attempts"]] == pytest.approx([flops(10, 10) / 1e4 + 0.5,
                                                                             flops(11, 11) / 1e4 + 0.5])
    assert [layer.filters for layer in pruned.layers[1:]] == [11, 11, 4]
    assert latency["measured_ms"] == pytest.approx(18.804) and latency["predicted_ms"] == pytest.approx(18.804)
    assert latency["within"] == pytest.approx(0.804 / 18) and latency["within"] < 0.05
    assert report["target_latency"] == 18.0 and latency["table"]["runtime"] == "clock-1t"


def test_latency_budgets_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="already runs in 36.34 ms"):
        prune(_model(), "filters", target_latency=40.0, runtime=Clock())
    with pytest.raises(ValueError, match="needs the runtime"):
        prune(_model(), "filters", target_latency=10.0)
    with pytest.raises(ValueError, match="either --remove-flops or --target-latency"):
        prune(_model(), "filters", target_latency=10.0, remove_flops=0.5, runtime=Clock())
    with pytest.raises(ValueError, match=r"target latency 1 ms .*at most 9\d\.\d% of the latency"):
        prune(_model(), "filters", target_latency=1.0, round_to=1, runtime=Clock())


def test_the_tflite_runtime_times_single_layers():
    from kprune.report.runtimes import get_runtime

    runtime = get_runtime("tflite", threads=1, runs=2)
    layer = _model().get_layer("c2")
    times = runtime.time({"small": single_layer(layer, 4, 4), "large": single_layer(layer, 16, 16)})
    assert set(times) == {"small", "large"} and all(np.isfinite(list(times.values())))
    assert runtime.key == "tflite-1t"
    with pytest.raises(ValueError, match="runtime 'gpu': choose one of tflite, keras"):
        get_runtime("gpu")


def test_the_command_line_takes_a_latency_target_and_sensitivity_curves(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import kprune.report.runtimes as R
    from kprune.cli import main
    from kprune.models.io import save_model
    from tests.test_prune_budgets import CURVES

    monkeypatch.setattr(R, "get_runtime", lambda name, threads: Clock())
    save_model(_model(), tmp_path / "m.keras")
    (tmp_path / "curves.json").write_text(json.dumps(CURVES))
    common = ["prune", str(tmp_path / "m.keras"), "--method", "filters", "--round-to", "1",
              "--out", str(tmp_path / "p.keras")]
    result = CliRunner().invoke(main, [*common, "--target-latency", "18", "--runtime", "keras"])
    assert result.exit_code == 0, result.output
    assert "latency budget (clock-1t): 18.00 ms asked, dense 36.34 ms; pruned: predicted 18.80 ms, measured " \
           "18.80 ms (4.5% off the target, 2 search(es)); latency table: 44 entries measured" in result.output
    result = CliRunner().invoke(main, [*common, "--remove-flops", "0.5", "--allocation", "sensitivity",
                                       "--sensitivity", str(tmp_path / "curves.json")])
    assert result.exit_code == 0, result.output
    assert "c2                           16 -> 6      filters" in result.output
    (tmp_path / "bad.json").write_text("{}")
    result = CliRunner().invoke(main, [*common, "--remove-flops", "0.5", "--allocation", "sensitivity",
                                       "--sensitivity", str(tmp_path / "bad.json")])
    assert result.exit_code != 0 and "not a kprune sensitivity result" in result.output
