"""FLOPs budgets: the smallest ratio that removes at least the asked fraction, on a model whose
FLOPs are counted by hand."""

import numpy as np
import pytest

from kprune._keras import keras
from kprune.models.counting import count_flops
from kprune.prune.command import prune


def _model(c1_scale=1.0):
    # 8x8x3 -> conv 3x3 (16) -> conv 3x3 (16) -> conv 1x1 (4, an output: never pruned). With k1 and
    # k2 filters kept, FLOPs = 2 * 64 * (9 * 3 * k1 + 9 * k1 * k2 + 4 * k2); dense (16, 16): 358,400
    x = inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="out")(x))
    rng = np.random.default_rng(0)
    for name, scale in (("c1", c1_scale), ("c2", 1.0)):
        layer = model.get_layer(name)
        kernel = rng.uniform(0.5, 1.0, layer.kernel.shape) * scale
        layer.set_weights([kernel.astype(np.float32), np.zeros(layer.filters, np.float32)])
    return model


def flops(k1, k2):
    return 2 * 64 * (9 * 3 * k1 + 9 * k1 * k2 + 4 * k2)


def test_uniform_budget_lands_on_the_first_width_that_meets_it():
    model = _model()
    assert count_flops(model) == flops(16, 16) == 358_400
    pruned, report, _ = prune(model, "filters", remove_flops=0.5, allocation="uniform", round_to=1)
    # 11 filters kept remove 48.9 % (183,040 FLOPs), 10 remove 56.8 % (154,880): uniform steps are that coarse
    assert [layer.filters for layer in pruned.layers[1:]] == [10, 10, 4]
    assert report["flops_after"] == flops(10, 10) == 154_880
    assert 1 - flops(11, 11) / 358_400 < 0.5 <= 1 - report["flops_after"] / report["flops_before"]
    assert report["remove_flops"] == 0.5 and round(16 * report["ratio"]) == 6


def test_global_budget_takes_the_cheapest_filters_first():
    # c1's filters are 10x heavier: the global L1 ranking removes c2's alone. With k1 = 16,
    # FLOPs = 55,296 + 18,944 k2: 7 kept remove 47.6 %, 6 kept remove 52.9 % (168,960 FLOPs)
    pruned, report, _ = prune(_model(c1_scale=10.0), "filters", remove_flops=0.5, allocation="global", round_to=1)
    assert [layer.filters for layer in pruned.layers[1:]] == [16, 6, 4]
    assert report["flops_after"] == flops(16, 6) == 168_960
    # a finer budget lands finer: 0.45 needs 7 kept (187,904 FLOPs, 47.6 %)
    _, report, _ = prune(_model(c1_scale=10.0), "filters", remove_flops=0.45, allocation="global", round_to=1)
    assert report["flops_after"] == flops(16, 7) == 187_904


def test_budgets_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match=r"at most 9\d\.\d% of the FLOPs"):
        prune(_model(), "filters", remove_flops=0.999, allocation="uniform", round_to=1)
    with pytest.raises(ValueError, match="only method filters meets a budget"):
        prune(_model(), "global", remove_flops=0.5)
    with pytest.raises(ValueError, match="only method filters meets a budget, pruned at once \\(schedule once; "
                                         "got method filters, schedule gradual\\)"):
        prune(_model(), "filters", remove_flops=0.5, schedule="gradual")
    with pytest.raises(ValueError, match="either --ratio or --remove-flops"):
        prune(_model(), "filters", ratio=0.5, remove_flops=0.5)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        prune(_model(), "filters", remove_flops=1.5)


def test_the_command_line_takes_a_flops_budget(tmp_path):
    from click.testing import CliRunner

    from kprune.cli import main
    from kprune.models.io import save_model

    save_model(_model(), tmp_path / "m.keras")
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "m.keras"), "--method", "filters", "--remove-flops",
                                       "0.5", "--round-to", "1", "--out", str(tmp_path / "p.keras")])
    assert result.exit_code == 0, result.output
    assert "FLOPs budget: 50.0% asked, 56.8% removed" in result.output  # 154,880 of 358,400 left


# sensitivity curves of _model(): c1 loses mAP as soon as it is pruned, c2 holds up to half its filters
CURVES = {"baseline": 0.8, "ratios": [0.25, 0.5, 0.75],
          "layers": [{"name": "c1", "producers": ["c1"], "map50": [0.7, 0.6, 0.5]},
                     {"name": "c2", "producers": ["c2"], "map50": [0.8, 0.81, 0.79]}]}


def test_sensitivity_ratios_keep_every_layer_within_the_tolerated_loss():
    from kprune.prune.allocation import max_loss, sensitivity_ratios

    # c1's losses 0.1, 0.2, 0.3; c2's 0, 0 (a gain counts as no loss), 0.01; linear in between, 0 at 0
    assert sensitivity_ratios(CURVES, 0.05) == {"c1": pytest.approx(0.125), "c2": 0.75}
    assert sensitivity_ratios(CURVES, 0.005) == {"c1": pytest.approx(0.0125), "c2": pytest.approx(0.625)}
    assert sensitivity_ratios(CURVES, 0.0) == {"c1": 0.0, "c2": 0.5}
    assert max_loss(CURVES) == pytest.approx(0.3)


def test_sensitivity_allocation_meets_a_flops_budget_from_the_robust_layer():
    # tolerance t: c2 keeps round(16 (1 - 0.5 - 0.25 t / 0.01)) filters, c1 loses round(16 * 0.25 t / 0.1);
    # the least t removing 50 % keeps c1 whole and 6 of c2 (168,960 FLOPs, 52.9 %; 7 kept: 47.6 %)
    pruned, report, _ = prune(_model(), "filters", remove_flops=0.5, allocation="sensitivity", round_to=1,
                              sensitivity=CURVES)
    assert [layer.filters for layer in pruned.layers[1:]] == [16, 6, 4]
    assert report["flops_after"] == flops(16, 6) == 168_960
    assert 0.00375 <= report["ratio"] < 0.00625  # the tolerance found: c2's ratio 0.5 + 25 t in [0.59375, 0.65625)
    with pytest.raises(ValueError, match="give --remove-flops or --target-latency"):
        prune(_model(), "filters", ratio=0.5, allocation="sensitivity", sensitivity=CURVES)
    with pytest.raises(ValueError, match="needs the sensitivity curves"):
        prune(_model(), "filters", remove_flops=0.5, allocation="sensitivity")
