"""Sensitivity analysis: each layer pruned alone scores what the physically pruned model scores."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from kprune.cli import main
from kprune.darknet.builder import build_model
from kprune.evaluate import evaluate_loaded
from kprune.models.io import save_model
from kprune.prune.sensitivity import analyze, table
from kprune.prune.structured import prune_filters
from tests.conftest import cfg_path, randomize


@pytest.fixture(scope="module")
def tiny():
    # random weights small enough that the boxes stay near the anchors: an mAP that is small but
    # not zero, and that changes when filters go
    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=1, scale=0.1)
    return model


def test_silenced_layers_score_like_pruned_models(tiny, tiny_synth_data):
    before = [w.copy() for w in tiny.get_weights()]
    result = analyze(tiny, tiny_synth_data, ratios=[0.25, 0.75], scope="conv_(4|12)", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(before, tiny.get_weights()))  # restored
    assert result["baseline"] == pytest.approx(evaluate_loaded(tiny, tiny_synth_data)["map50"], abs=1e-9)
    rows = {row["name"]: row for row in result["layers"]}
    assert list(rows) == ["conv_4", "conv_12"] and result["images"] == 8
    assert rows["conv_4"]["kept"] == [12, 4] and rows["conv_12"]["kept"] == [192, 64]  # 16 and 256 filters
    scores = [m for row in result["layers"] for m in row["map50"]]
    assert len(set(np.round(scores, 6))) > 1 and max(scores) > 0  # the numbers carry information
    for name, row in rows.items():
        for ratio, expected in zip(result["ratios"], row["map50"]):
            pruned = prune_filters(tiny, 0.0, allocation="independent", ratios={name: ratio}, round_to=1).model
            assert evaluate_loaded(pruned, tiny_synth_data)["map50"] == pytest.approx(expected, abs=1e-4), (name, ratio)
    text = table(result).splitlines()
    assert text[1].split() == ["layer", "filters", "25%", "75%"] and text[3].split()[:2] == ["conv_4", "16"]


def test_sensitivity_command(tiny, tiny_synth_data, tmp_path):
    path = tmp_path / "tiny.keras"
    save_model(tiny, path)
    runner = CliRunner()
    result = runner.invoke(main, ["sensitivity", str(path), "--data", tiny_synth_data, "--ratios", "0.5",
                                  "--scope", "backbone", "--limit", "4", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    folder = tmp_path / "tiny.sensitivity"
    assert json.loads((folder / "sensitivity.json").read_text()) == report and report["images"] == 4
    with open(folder / "sensitivity.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == [row["name"] for row in report["layers"]] and len(rows) == 6  # conv_0 .. conv_10
    assert (folder / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args, message in [(["--ratios", "0.5,1.5"], "each must be in (0, 1)"), (["--ratios", "half"], "comma-separated"),
                          (["--scope", "nothing_here"], "matches no prunable layer")]:
        result = runner.invoke(main, ["sensitivity", str(path), "--data", tiny_synth_data, *args])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
