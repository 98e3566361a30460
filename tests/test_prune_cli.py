"""`kprune prune`: the JSON contract, the history file, retraining, and one-line errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kprune.cli import main
from kprune.darknet.builder import build_model
from kprune.evaluate import evaluate_loaded
from kprune.models.io import load_model, save_model
from kprune.prune.surgeon import apply_history
from kprune.models.counting import count_flops, count_params
from tests.conftest import cfg_path, randomize


def _run(*args):
    return CliRunner().invoke(main, ["prune", *[str(a) for a in args]], catch_exceptions=False)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("prune") / "dense.keras"
    model = build_model(cfg_path("yolov2"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=3, scale=0.05)
    save_model(model, path)
    return path


def test_filters_json_and_history(dense, tmp_path):
    out = tmp_path / "pruned.keras"
    result = _run(dense, "--method", "filters", "--ratio", "0.5", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    model, pruned = load_model(dense), load_model(out)
    assert report["params_before"] == count_params(model)["params"] == 3_180_010  # summed by hand
    assert report["params_after"] == count_params(pruned)["params"] < report["params_before"]
    assert report["flops_before"] == count_flops(model) and report["flops_after"] == count_flops(pruned)
    assert report["nonzero_params_after"] == count_params(pruned)["nonzero_params"]
    layers = {row["name"]: row for row in report["layers"]}
    assert layers["conv_0"] == {"name": "conv_0", "channels_before": 8, "channels_after": 8}  # rounded to 8
    assert layers["conv_22"]["channels_after"] == 128 and layers["conv_30"]["channels_after"] == 50
    history = json.loads((tmp_path / "pruned.history.json").read_text())
    replayed = apply_history(model, history)
    x = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(replayed(x).numpy(), pruned(x).numpy())


def test_global_sparsity_json(dense, tmp_path):
    result = _run(dense, "--method", "global", "--ratio", "0.6", "--out", tmp_path / "s.keras", "--json")
    report = json.loads(result.output)
    kernels = sum(load_model(dense).get_layer(row["name"]).kernel.shape.num_elements() for row in report["layers"])
    zeros = report["nonzero_params_before"] - report["nonzero_params_after"]
    assert zeros == pytest.approx(0.6 * kernels, abs=len(report["layers"]))
    assert report["params_after"] == report["params_before"] and report["flops_after"] == report["flops_before"]
    assert "conv_30" not in {row["name"] for row in report["layers"]}  # outputs only when asked
    assert all(row["sparsity_before"] == 0 and row["sparsity_after"] > 0 for row in report["layers"])


def test_errors_are_one_line(dense, tmp_path):
    out = tmp_path / "x.keras"
    cases = [
        (["--method", "filters", "--out", out], "method filters needs --ratio"),
        (["--method", "threshold", "--ratio", "0.5", "--out", out], "method threshold needs --threshold"),
        (["--method", "filters", "--ratio", "0.5", "--data", tmp_path, "--out", out], "needs both --data and --epochs"),
        (["--method", "tfmot-constant", "--ratio", "0.5", "--out", out], "prunes while training"),
        (["--method", "filters", "--ratio", "1.2", "--out", out], r"ratio 1.2: must be in [0, 1)"),
        (["--method", "filters", "--allocation", "independent", "--layer-ratio", "conv_4", "--out", out], "expected LAYER=RATIO"),
        (["--method", "filters", "--ratio", "0.5", "--out", tmp_path / "x.h5"], "must end in .keras"),
    ]
    for args, message in cases:
        result = _run(dense, *args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_prune_while_retraining_on_the_cubic_schedule(dense, tiny_synth_data, tmp_path):
    out = tmp_path / "p.keras"
    result = _run(dense, "--method", "tfmot-polynomial", "--ratio", "0.5", "--data", tiny_synth_data,
                  "--epochs", "2", "--batch-size", "4", "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (tmp_path / "p.run" / "metrics.json").is_file()
    model = load_model(out)
    # the figure printed is the saved (stripped) model's
    assert report["retrained"]["map50"] == pytest.approx(evaluate_loaded(model, tiny_synth_data)["map50"], abs=1e-6)
    for row in report["layers"]:
        size = model.get_layer(row["name"]).kernel.shape.num_elements()
        # tfmot keeps the few weights tied with its threshold
        assert round(size * 0.5) - 4 <= round(row["sparsity_after"] * size) <= round(size * 0.5)


@pytest.mark.slow
def test_gradual_and_iterative_rounds(dense, tiny_synth_data, tmp_path):
    out = tmp_path / "g.keras"
    result = _run(dense, "--method", "filters", "--schedule", "gradual", "--ratio", "0.5", "--rounds", "2",
                  "--data", tiny_synth_data, "--epochs", "1", "--batch-size", "4", "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["criterion"] == "l1-normalized"
    assert [r["target"] for r in report["rounds"]] == pytest.approx([0.4375, 0.5])  # 0.5 - 0.5 / 8, then 0.5
    assert [r["round"] for r in report["rounds"]] == [1, 2] and report["rounds"][1]["removed"] == pytest.approx(0.5, abs=0.05)
    for t in (1, 2):
        assert (tmp_path / "g.run" / f"round-{t}" / "final.keras").is_file()
    model = load_model(out)
    assert report["params_after"] == count_params(model)["params"] == report["rounds"][1]["params"]
    assert report["flops_after"] < 0.6 * report["flops_before"]
    assert report["retrained"]["map50"] == report["rounds"][1]["map50"]
    history = json.loads((tmp_path / "g.history.json").read_text())
    assert count_params(apply_history(load_model(dense), history)) == count_params(model)

    # iterative: a baseline from the dense model, then rounds until the drop (none accepted here)
    result = _run(dense, "--method", "filters", "--schedule", "iterative", "--ratio", "0.25", "--rounds", "1",
                  "--max-drop", "-1", "--data", tiny_synth_data, "--epochs", "1", "--batch-size", "4",
                  "--out", tmp_path / "i.keras", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["baseline_map50"] == evaluate_loaded(load_model(dense), tiny_synth_data)["map50"]
    assert report["max_drop"] == -1
    assert len(report["rounds"]) == 1 and "round 0 is kept" in report["stopped"]
    assert report["params_after"] == report["params_before"] and "retrained" not in report


def test_prune_in_memory_and_the_file_adapter(dense, tmp_path):
    from kprune.prune.command import prune

    model = load_model(dense)
    weights = model.get_weights()
    pruned, report, history = prune(model, "filters", ratio=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))  # the input is left as it was
    out = tmp_path / "p.keras"
    result = _run(dense, "--method", "filters", "--ratio", "0.5", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    saved = json.loads(result.output)
    # the adapter's report: prune's, with the model's path second, then the files it wrote
    assert list(saved) == ["method", "model", *list(report)[1:], "out", "history"]
    assert saved["model"] == str(dense) and saved["out"] == str(out)
    assert {k: v for k, v in saved.items() if k not in ("model", "out", "history")} == json.loads(json.dumps(report))
    assert json.loads((tmp_path / "p.history.json").read_text()) == json.loads(json.dumps(history))
    x = np.random.default_rng(1).random((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(pruned(x).numpy(), load_model(out)(x).numpy())
    with pytest.raises(ValueError, match="give run_dir"):  # retraining writes a run: it needs a folder
        prune(model, "global", ratio=0.5, data=str(tmp_path), epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.history.json", "p.keras"]


def test_unstructured_prune_in_memory_is_a_detector(dense, tmp_path):
    from kprune.models.layers import detection_heads
    from kprune.prune.command import prune

    model = load_model(dense)
    pruned, report, _ = prune(model, "global", ratio=0.6)
    # its own layers: the head is found among the outputs, as in the saved and reloaded model
    (head,) = detection_heads(pruned)
    assert head.name == detection_heads(model)[0].name and len(head._inbound_nodes) == 1
    save_model(pruned, tmp_path / "g.keras")
    x = np.random.default_rng(2).random((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(pruned(x).numpy(), load_model(tmp_path / "g.keras")(x).numpy())
    assert report["nonzero_params_after"] == count_params(pruned)["nonzero_params"] < report["nonzero_params_before"]
