"""An experiment keeps a cell's model in memory: the baseline is loaded once per cell, the final
model saved once, and the results are those of the files."""

import json

import pytest

from kprune._keras import keras
from kprune.darknet.builder import build_model
from kprune.evaluate import evaluate_model
from kprune.experiment import Experiment, ExperimentConfig
from kprune.models.io import save_model
from tests.conftest import cfg_path, randomize


@pytest.mark.slow
def test_a_cell_loads_the_baseline_once(tmp_path, tiny_synth_data, monkeypatch):
    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=2, scale=0.05)
    save_model(model, tmp_path / "given.keras")
    run = tmp_path / "run"
    config = ExperimentConfig(name="loads", dataset=tiny_synth_data, baseline={"model": str(tmp_path / "given.keras")},
                              sweep=[{"method": "filters", "allocation": "uniform", "criterion": "l1", "ratios": [0.5]},
                                     {"method": "global", "ratios": [0.6], "epochs": 0}],
                              retrain={"epochs": 1, "batch_size": 4}, export=["none"], out=str(run))
    experiment = Experiment(config, progress=False, log=lambda line: None)
    # retraining is a stand-in that changes the weights in memory (real retraining: test_experiment.py)
    import kprune.experiment as E

    def retrain(model, *args, **kwargs):
        model.get_layer("conv_0").kernel.assign(model.get_layer("conv_0").kernel * 0.5)
        return model, {}

    monkeypatch.setattr(E, "retrain", retrain)
    loads = []
    load = keras.models.load_model

    def counted(path, *args, **kwargs):
        loads.append(str(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(keras.models, "load_model", counted)  # every kprune load ends here
    baseline = experiment.baseline()
    assert loads == [str(tmp_path / "given.keras")]  # 7 before the models stayed in memory
    filters, sparse = experiment.cells
    loads.clear()
    result = experiment.cell(filters)
    assert loads == [str(run / "baseline" / "model.keras")]  # 9 before
    loads.clear()
    unretrained = experiment.cell(sparse)
    assert loads == [str(run / "baseline" / "model.keras")]  # 8 before
    monkeypatch.setattr(keras.models, "load_model", load)
    folder = run / "cells" / filters["label"]

    # written once each: the final model, the exports with their metadata, the history, the result
    assert sorted(p.name for p in folder.iterdir()) == [
        "final.json", "final.keras", "final.tflite", "pruned.history.json", "result.json"]
    assert json.loads((folder / "result.json").read_text()) == json.loads(json.dumps(result))
    assert (run / "baseline" / "model.keras").read_bytes() == (run / "baseline" / "final.keras").read_bytes()
    # the figures measured in memory are those of the saved files
    for row, where in ((baseline, run / "baseline"), (result, folder), (unretrained, run / "cells" / sparse["label"])):
        assert row["map50"] == evaluate_model(str(where / "final.keras"), tiny_synth_data)["map50"]
        for quant, name in (("none", "final.tflite"),):  # int8 files: test_sweep_end_to_end_and_resume
            scores = evaluate_model(str(where / name), tiny_synth_data, keras_path=str(where / "final.keras"))
            assert row["export"][quant]["map50"] == scores["map50"]
            assert row["export"][quant]["bytes"] == (where / name).stat().st_size
        assert row["measure"]["keras_size"]["bytes"] == (where / "final.keras").stat().st_size
    assert result["retrained"] is True and result["measure"]["params"] < baseline["measure"]["params"]
    assert unretrained["retrained"] is False and unretrained["map50"] == unretrained["map50_pruned"]
    assert sorted(p.name for p in (run / "cells" / sparse["label"]).iterdir()) == [
        "final.json", "final.keras", "final.tflite", "result.json"]
