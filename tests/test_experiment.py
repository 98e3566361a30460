"""A sweep end to end in small: baseline, structured and unstructured cells, report, resume."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kprune.cli import main
from kprune.experiment import ExperimentConfig, cells, load_config, retrain_options, training_values

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _config(tmp_path, data, **changes):
    values = {
        "name": "tiny sweep",
        "dataset": data,
        "baseline": {"train": {"model": "yolov2-tiny", "input_size": 64, "width": 0.25, "epochs": 1,
                               "batch_size": 4, "lr": 0.001, "recalibrate_bn": 2}},
        "sweep": [{"method": "filters", "allocation": "uniform", "criterion": "l1", "ratios": [0.5]},
                  {"method": "global", "ratios": [0.6], "epochs": 0}],  # no retraining for this one
        "retrain": {"epochs": 1, "batch_size": 4, "recalibrate_bn": 2},
        "export": ["int8"],
        "latency_runs": 2,
        "latency_threads": [2],
        "samples": 1,
        "out": str(tmp_path / "run"),
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_config_checks(tmp_path):
    path = _config(tmp_path, "data")
    config = load_config(path)
    assert config.export == ["none", "int8"]  # the float file is always there
    assert [c["label"] for c in cells(config)] == ["filters-uniform-l1-0.5", "global-0.6"]
    for changes, message in [({"sweep": []}, "at least one method"),
                             ({"sweep": [{"method": "cut", "ratios": [0.5]}]}, "method 'cut'"),
                             ({"sweep": [{"method": "global", "ratio": 0.5}]}, "sweep.0: unknown key(s) ratio; known keys: method, ratios"),
                             ({"baseline": {}}, "either {model"),
                             ({"export": ["int4"]}, "choose from"),
                             ({"ray": {"cpu": 1}}, "ray: unknown key(s) cpu; known keys: cpus, gpus, retries"),
                             ({"sweep": [{"method": "global", "ratios": [0.5], "distill": -1}]}, "distill -1"),
                             ({"colour": "red"}, "unknown key(s) colour; known keys: name, dataset, baseline"),
                             ({"sweep": [{"method": "global", "ratios": [0.5, "half"]}]},
                              "sweep.0.ratios.1 = 'half': expected a number"),
                             ({"seeds": True}, "seeds = True: expected a number, not true or false"),
                             ({"sweep": [{"method": "global", "ratios": [0.5], "features": ["conv_4"]}]},
                              "features (layers to imitate) go with distill"),
                             ({"compare": {"a": {"train": {}, "colour": 1}}},
                              "compare.a: unknown key(s) colour; known keys: model, config, train")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(_config(tmp_path, "data", **changes))
    budgets = load_config(_config(tmp_path, "data", sweep=[
        {"method": "filters", "allocation": "sensitivity", "sensitivity": "s.json", "target_latency": [20, 15],
         "runtime": "keras", "threads": 2, "label": "fast"},
        {"method": "filters", "remove_flops": [0.5], "label": "half"}]))
    assert [(c["label"], c.get("target_latency"), c.get("remove_flops")) for c in cells(budgets)] == [
        ("fast-20ms", 20, None), ("fast-15ms", 15, None), ("half-flops0.5", None, 0.5)]
    for entry, message in [({"method": "filters", "ratios": [0.5], "runtime": "keras"}, "belong to target_latency"),
                           ({"method": "filters", "target_latency": [9], "runtime": "gpu"}, "runtime 'gpu'"),
                           ({"method": "filters", "target_latency": [9], "remove_flops": [0.5]}, "not remove_flops and"),
                           ({"method": "filters", "allocation": "sensitivity", "remove_flops": [0.5]}, "sensitivity curves")]:
        with pytest.raises(ValueError, match=message):
            load_config(_config(tmp_path, "data", sweep=[entry]))
    with pytest.raises(ValueError, match="appear twice"):
        cells(ExperimentConfig(baseline={"model": "m.keras"}, sweep=[{"method": "global", "ratios": [0.5, 0.5]}]))


def test_a_sweep_entry_sets_its_own_distillation(tmp_path, tiny_synth_data):
    """``distill: W`` in a sweep entry replaces ``retrain``'s distillation for that entry's cells
    (0: none); the other entries keep ``retrain``'s."""
    from kprune.experiment import Experiment

    config = load_config(_config(tmp_path, tiny_synth_data, retrain={"epochs": 1, "distill": {"teacher": "dense",
                                                                                     "weight": 2.0}}))
    experiment = Experiment(config)
    assert experiment._options(1)["distill"] == {"teacher": "dense", "weight": 2.0}
    assert experiment._options(1)["seed"] == 1
    assert experiment._options(0, {"distill": 0.5})["distill"] == {"teacher": "dense", "weight": 0.5}
    assert experiment._options(0, {"distill": 0})["distill"] is None
    assert experiment._options(0, {"distill": 0.5, "features": ["conv_4"]})["distill"] == {
        "teacher": "dense", "weight": 0.5, "features": ["conv_4"]}


def test_shipped_experiments_load():
    """Every config in experiments/ validates, with the cells and training modes it documents."""
    from kprune.config import build, read_yaml
    from kprune.train import TrainConfig

    expected = {"demo": 2, "demo_seeds": 2, "demo_all": 8, "yolov2_coco5": 5, "yolov4_tiny_coco5": 5, "synth_yolov4_tiny_prune": 2, "yolov2_kitti": 3, "gradual_global": 9,
                "threshold_vs_percentage": 8, "backbone_vs_head": 6, "quantize": 2, "ssd_gradual_global": 9,
                "ssd_gradual_global_synth": 9, "recovery": 10, "recovery_slimming": 2,
                "demo_recovery": 3, "recovery_imitation": 2, "recovery_all": 2, "demo_qat": 2,
                "faster_rcnn_backbone_vs_head": 24, "faster_rcnn_backbone_vs_head_synth": 12}
    found = {}
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        if "sweep" not in read_yaml(path):  # training configs
            continue
        config = load_config(str(path))
        found[path.stem] = len(cells(config))
        trained = set(config.baseline) - {"model"}  # a baseline model may come with its training settings
        specs = {"baseline": config.baseline, **config.compare} if trained else config.compare
        modes = {}
        for label, spec in specs.items():
            values = training_values(spec)
            modes[label] = build(TrainConfig, {**values, "dataset": "unused"}, f"{path.name} {label}").mode
        # pruned models retrain from their file with the baseline's settings (no new anchors, size or mode)
        build(TrainConfig, {**retrain_options(config), "init": "pruned.keras", "dataset": "unused"}, path.name)
        if path.stem == "yolov2_kitti":
            assert modes == {"baseline": "new-head", "head": "head", "full": "full"}
        if path.stem == "recovery_slimming":  # the base's baseline model removed: trained here, with slimming
            assert "model" not in config.baseline and training_values(config.baseline)["slimming"] == 0.0001
            assert retrain_options(config)["slimming"] == 0.0
    assert found == expected


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path, tiny_synth_data):
    other = {"model": "yolov2-tiny", "input_size": 64, "width": 0.25, "epochs": 1, "batch_size": 4, "lr": 0.003,
             "recalibrate_bn": 2}
    path = _config(tmp_path, tiny_synth_data, compare={"higher-lr": {"train": other}}, spread=0.02)
    result = CliRunner().invoke(main, ["experiment", str(path), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    flat = {r["label"]: r for r in results["flat"]}
    # the filter cell retrained 1 epoch: its dense control is the baseline retrained 1 epoch; the
    # sparse cell was not retrained: its control is the baseline itself
    assert list(flat) == ["baseline", "dense-1ep", "filters-uniform-l1-0.5", "global-0.6"]
    base, filters, sparse = flat["baseline"], flat["filters-uniform-l1-0.5"], flat["global-0.6"]
    control = flat["dense-1ep"]
    assert control["kind"] == "control" and control["params"] == base["params"] and control["n"] == 1
    assert filters["control"] == "dense-1ep" and sparse["control"] == "baseline"
    assert filters["vs_control"]["change"] == pytest.approx(filters["map50"] - control["map50"])
    assert sparse["vs_control"]["change"] == pytest.approx(sparse["map50"] - base["map50"])
    for r in (filters, sparse, control):  # one run each: the given spread of 0.02 decides (a z-test)
        assert r["vs_baseline"]["test"] == "z" and r["vs_baseline"]["p"] is not None
    assert (run / "controls" / "dense-1ep" / "run" / "final.keras").is_file()
    assert json.loads((run / "controls" / "dense-1ep" / "result.json").read_text())["train_epochs"] == 1
    assert filters["flops_removed"] > 0.5 and filters["params"] < base["params"]  # 8 -> 8 in conv_0: not 75 %
    assert sparse["flops_removed"] == 0 and sparse["params"] == base["params"]
    assert sparse["map50"] == sparse["map50_pruned"] and results["rows"][3]["retrained"] is False
    assert sparse["nonzero_removed"] == pytest.approx(0.6 * 0.97, abs=0.05)  # kernels are ~97 % of the weights
    for row in results["rows"]:  # timed side by side at the end: every model, the same runs
        assert sorted(row["measure"]["latency"]) == ["keras_2t", "tflite_2t", "tflite_int8_2t"]
        assert {v["runs"] for v in row["measure"]["latency"].values()} == {2}
    for r in flat.values():
        # the float TFLite file scores as the Keras model (outputs within 1e-4): the same mAP to a point
        assert r["none_map50"] == pytest.approx(r["map50"], abs=0.01) and r["tflite_2t_ms"] > 0
        assert r["int8_tflite_mb"] < 0.4 * r["none_tflite_mb"]
        assert r["speedup_int8_2t"] == pytest.approx(r["tflite_2t_ms"] / r["tflite_int8_2t_ms"])
    for row in results["rows"]:  # the figures are those of the files as written
        folder = Path(row["model"]).parent
        assert row["export"]["int8"]["bytes"] == (folder / "final-int8.tflite").stat().st_size
        assert row["measure"]["keras_size"]["bytes"] == (folder / "final.keras").stat().st_size
    report = (run / "report.md").read_text()
    (compared,) = results["compare"]
    assert compared["label"] == "higher-lr" and compared["mode"] == "full" and compared["epochs"] == 1
    stored = json.loads((Path(compared["model"]).parent / "metrics.json").read_text())
    assert compared["map50"] == stored["map50"] and compared["coco_map"] == stored["coco_map"]
    assert "a change larger than 5.5 points" in report  # 1.96 * 0.02 * sqrt(2)
    for section in ("## Results", "## Findings", "## Retraining compared", "## Accuracy against size", "## Kept filters per layer",
                    "## Quantization (TFLite)", "## Latency", "## Sizes", "## Sample detections", "## Configuration"):
        assert section in report, section
    sections = {part.split("\n", 1)[0]: part for part in report.split("\n## ")[1:]}
    for name, rows, text_columns in (("Results", 4, 1), ("Retraining compared", 1, 2), ("Quantization (TFLite)", 4, 1),
                                     ("Latency", 3, 1), ("Sizes", 4, 1)):
        table = [line for line in sections[name].splitlines() if line.startswith("|")][2:]
        assert len(table) == rows, name
        for line in table:  # every cell past the label holds a number (or the dash of "not measured")
            cells_ = [c.strip() for c in line.strip("|").split("|")][text_columns:]
            assert all(any(ch.isdigit() for ch in c) or c == "–" for c in cells_), line
            # "mAP pruned" of the baseline and of the control, their changes against a control, the
            # baseline's minutes (what a model cost on top of the baseline)
            dashes = 4 if line.startswith("| baseline") else 3 if line.startswith("| dense") else 1
            assert sum(c == "–" for c in cells_) <= dashes, line
    assert "goal is within 1 point: " in sections["Findings"]
    for name in ("map_vs_params", "map_vs_flops", "latency_vs_flops", "kept_filters", "samples"):
        assert (run / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    import cv2

    # one sample image: the baseline and the most pruned structured model side by side (3.2 x 3.4 in at 120 dpi)
    assert cv2.imread(str(run / "samples.png")).shape == (408, 768, 3)
    assert (run / "results.csv").read_text().count("\n") == 5
    # a rerun finds every cell done: same results, no new training
    stamp = (run / "cells" / "global-0.6" / "result.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, ["experiment", str(path), "--quiet"], catch_exceptions=False)
    assert again.exit_code == 0 and (run / "cells" / "global-0.6" / "result.json").stat().st_mtime_ns == stamp
    # a quantization added to export afterwards: every part's stored final.keras exported, nothing retrained
    trained = (run / "cells" / "filters-uniform-l1-0.5" / "run" / "final.keras").stat().st_mtime_ns
    path = _config(tmp_path, tiny_synth_data, compare={"higher-lr": {"train": other}}, spread=0.02,
                   export=["int8", "fp16"])
    more = CliRunner().invoke(main, ["experiment", str(path), "--quiet"], catch_exceptions=False)
    assert more.exit_code == 0, more.output
    assert (run / "cells" / "filters-uniform-l1-0.5" / "run" / "final.keras").stat().st_mtime_ns == trained
    for row in json.loads((run / "results.json").read_text())["rows"]:
        folder = Path(row["model"]).parent
        assert sorted(row["export"]) == ["fp16", "int8", "none"]
        assert row["export"]["fp16"]["bytes"] == (folder / "final-fp16.tflite").stat().st_size
        assert row["export"]["int8"] == results["rows"][[r["model"] for r in results["rows"]].index(row["model"])]["export"]["int8"]
        # half-precision weights: the file is about half the float one and scores as the Keras model
        assert row["export"]["fp16"]["bytes"] < 0.6 * row["export"]["none"]["bytes"]
        assert row["export"]["fp16"]["map50"] == pytest.approx(row["map50"], abs=0.01)


def _stand_ins(monkeypatch, tmp_path) -> list:
    """A given baseline model (``tmp_path / "given.keras"``), and retraining replaced by a recorder
    (returned: its calls), export and timing by stand-ins (the real ones are tested above)."""
    import kprune.experiment as E
    from kprune.darknet.builder import build_model
    from kprune.models.io import save_model
    from tests.conftest import cfg_path, randomize

    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=2, scale=0.05)
    save_model(model, tmp_path / "given.keras")
    calls = []

    def recorded(model, run_dir, data, epochs, options, progress, keep_sparsity=False, prepare=None, teacher=None):
        calls.append((Path(run_dir).relative_to(tmp_path / "run").as_posix(), epochs, options["seed"]))
        return model, {}

    monkeypatch.setattr(E, "retrain", recorded)

    def finish(self, folder, model):  # saved and scored for real; export and timing stand-ins (tested above)
        from kprune.evaluate import evaluate_loaded
        from kprune.models.counting import count_flops, count_params

        save_model(model, folder / "final.keras")
        score = evaluate_loaded(model, self.data)["map50"]
        sizes = {"bytes": 1, "gzip": 1, "bzip2": 1, "xz": 1}
        return {"model": str(folder / "final.keras"), "map50": score, "coco_map": 0.0,
                "export": {"none": {"bytes": 1, "max_abs_diff": 0.0, "map50": score}},
                "measure": {**count_params(model), "flops": count_flops(model), "keras_size": sizes,
                            "tflite_size": sizes}}

    def latency(self, rows):
        for r in rows:
            r["measure"]["latency"] = {"keras_2t": {"median_ms": 2.0}, "tflite_2t": {"median_ms": 1.0}}

    monkeypatch.setattr(E.Experiment, "_finish", finish)
    monkeypatch.setattr(E.Experiment, "latency", latency)
    return calls


def test_seeds_give_each_training_its_seed_and_each_seed_its_controls(tmp_path, tiny_synth_data, monkeypatch):
    """``seeds: 2`` with a given baseline model: the cells and the dense controls run once per seed
    (seeds 7 and 8 from the config's 7), each seed's controls match its cells' epochs, and the report
    averages over the seeds. Retraining is replaced by a recorder, export and timing by stand-ins
    (the real ones are tested above)."""
    import kprune.experiment as E

    calls = _stand_ins(monkeypatch, tmp_path)
    config = E.ExperimentConfig(
        name="seeds", dataset=tiny_synth_data, baseline={"model": str(tmp_path / "given.keras"), "train": {"seed": 7}},
        sweep=[{"method": "global", "ratios": [0.6], "epochs": 3}],
        retrain={"epochs": 1, "batch_size": 4}, export=["none"], latency_runs=1, latency_threads=[2], samples=0,
        seeds=2, out=str(tmp_path / "run"))
    results = E.Experiment(config, progress=False, log=lambda line: None).run()
    assert calls == [("cells/global-0.6/run", 3, 7), ("controls/dense-3ep/run", 3, 7),
                     ("cells/global-0.6.seed1/run", 3, 8), ("controls/dense-3ep.seed1/run", 3, 8)]
    runs = [(r["label"], r["seed"]) for r in results["runs"]]
    assert runs == [("baseline", None), ("dense-3ep", 7), ("dense-3ep", 8), ("global-0.6", 7), ("global-0.6", 8)]
    summary = {r["label"]: r for r in results["flat"]}
    assert [summary[k]["n"] for k in summary] == [1, 2, 2]
    # the recorder returns the model unchanged: a control scores as the baseline, a sparse cell as
    # itself on both seeds (std 0), so against its control the test is Welch's with a certain answer
    base, sparse = summary["baseline"]["map50"], summary["global-0.6"]
    assert summary["dense-3ep"]["map50"] == base and summary["dense-3ep"]["map50_std"] == 0
    assert sparse["control"] == "dense-3ep" and sparse["vs_control"]["test"] == "welch"
    assert sparse["vs_control"]["change"] == pytest.approx(sparse["map50"] - base)
    assert sparse["vs_control"]["verdict"] == ("within spread" if sparse["map50"] == base else
                                               "better" if sparse["map50"] > base else "worse")
    # one baseline model for both seeds: its vs_baseline against itself is not asked; the control's is 0
    assert summary["baseline"]["vs_baseline"] is None and summary["dense-3ep"]["vs_baseline"]["change"] == 0
    # a rerun finds everything done
    calls.clear()
    E.Experiment(config, progress=False, log=lambda line: None).run()
    assert calls == []


def test_parts_run_one_by_one_and_report_as_a_serial_run(tmp_path, tiny_synth_data, monkeypatch):
    """--list names every part; --cell runs one after the baseline it needs; --report gathers what is
    done; the parts run one by one report what a serial run reports."""
    import kprune.experiment as E

    calls = _stand_ins(monkeypatch, tmp_path)
    sweep = [{"method": "filters", "allocation": "uniform", "criterion": "l1", "ratios": [0.5]},
             {"method": "global", "ratios": [0.6], "epochs": 0}]
    path = _config(tmp_path, tiny_synth_data, baseline={"model": str(tmp_path / "given.keras")}, sweep=sweep,
                   retrain={"epochs": 1, "batch_size": 4}, export=["none"], samples=0)
    run = tmp_path / "run"

    def experiment(*args):
        return CliRunner().invoke(main, ["experiment", str(path), "--quiet", *args])

    listed = experiment("--list")
    assert listed.exit_code == 0, listed.output
    rows = [line.split("\t") for line in listed.output.splitlines()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("baseline", "baseline", "to do"),
                                                  ("filters-uniform-l1-0.5", "cell", "to do"),
                                                  ("global-0.6", "cell", "to do"), ("dense-1ep", "control", "to do")]
    assert "nothing to report before the baseline" in experiment("--report").output
    assert "no part 'nope'; its parts: baseline, filters-uniform-l1-0.5" in experiment("--cell", "nope").output
    assert "give one of" in experiment("--list", "--report").output

    done = experiment("--cell", "global-0.6")  # the baseline first, then only this cell
    assert done.exit_code == 0, done.output
    assert "\nglobal-0.6: done, mAP@0.5 " in done.output
    assert (run / "baseline" / "result.json").is_file() and (run / "cells" / "global-0.6" / "result.json").is_file()
    assert not (run / "cells" / "filters-uniform-l1-0.5").exists() and calls == []
    assert experiment("--report").exit_code == 0
    partial = json.loads((run / "results.json").read_text())
    assert [r["label"] for r in partial["flat"]] == ["baseline", "global-0.6"]

    assert experiment("--cell", "filters-uniform-l1-0.5", "--cell", "dense-1ep").exit_code == 0
    assert calls == [("cells/filters-uniform-l1-0.5/run", 1, 0), ("controls/dense-1ep/run", 1, 0)]
    assert {line.split("\t")[2] for line in experiment("--list").output.splitlines()} == {"done"}
    assert experiment("--report").exit_code == 0
    by_parts = json.loads((run / "results.json").read_text())
    # the same config run serially in another folder
    serial = E.Experiment(E.load_config(str(path)), progress=False, log=lambda line: None)
    serial.config.out, serial.out = str(tmp_path / "serial"), tmp_path / "serial"
    calls.clear()
    monkeypatch.setattr(E, "retrain", lambda model, *args, **kwargs: (model, {}))
    expected = serial.run()
    keys = ("label", "kind", "control", "params", "map50", "flops_removed", "nonzero_removed")
    assert [[r[k] for k in keys] for r in by_parts["flat"]] == [[r[k] for k in keys] for r in expected["flat"]]
    assert [r["label"] for r in by_parts["flat"]] == ["baseline", "dense-1ep", "filters-uniform-l1-0.5", "global-0.6"]
