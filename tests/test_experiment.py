"""A sweep end to end in small: baseline, structured and unstructured cells, report, resume."""

import json

import pytest
import yaml
from click.testing import CliRunner

from kprune.cli import main
from kprune.experiment import ExperimentConfig, cells, load_config


def _config(tmp_path, data, **changes):
    values = {
        "name": "tiny sweep",
        "dataset": data,
        "baseline": {"train": {"model": "yolov2-tiny", "input_size": 64, "width": 0.25, "epochs": 1,
                               "batch_size": 4, "lr": 0.001, "recalibrate_bn": 2}},
        "sweep": [{"method": "filters", "strategy": "uniform", "criterion": "l1", "ratios": [0.5]},
                  {"method": "global", "ratios": [0.6]}],
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
                             ({"sweep": [{"method": "global", "ratio": 0.5}]}, "unknown key(s) ratio"),
                             ({"baseline": {}}, "either {model"),
                             ({"export": ["int4"]}, "choose from"),
                             ({"colour": "red"}, "unknown key(s) colour")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(_config(tmp_path, "data", **changes))
    with pytest.raises(ValueError, match="appear twice"):
        cells(ExperimentConfig(baseline={"model": "m.keras"}, sweep=[{"method": "global", "ratios": [0.5, 0.5]}]))


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path, tiny_synth_data):
    path = _config(tmp_path, tiny_synth_data)
    result = CliRunner().invoke(main, ["experiment", str(path), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    flat = {r["label"]: r for r in results["flat"]}
    assert list(flat) == ["baseline", "filters-uniform-l1-0.5", "global-0.6"]
    base, filters, sparse = flat["baseline"], flat["filters-uniform-l1-0.5"], flat["global-0.6"]
    assert filters["flops_removed"] > 0.5 and filters["params"] < base["params"]  # 8 -> 8 in conv_0: not 75 %
    assert sparse["flops_removed"] == 0 and sparse["params"] == base["params"]
    assert sparse["nonzero_removed"] == pytest.approx(0.6 * 0.97, abs=0.05)  # kernels are ~97 % of the weights
    for r in flat.values():
        assert 0 <= r["map50"] <= 1 and 0 <= r["int8_map50"] <= 1 and r["tflite_2t_ms"] > 0
        assert r["int8_tflite_mb"] < 0.4 * r["none_tflite_mb"]
    report = (run / "report.md").read_text()
    for section in ("## Results", "## Findings", "## Accuracy against size", "## Kept filters per layer",
                    "## Quantization (TFLite)", "## Latency", "## Sizes", "## Sample detections", "## Configuration"):
        assert section in report, section
    table = report.split("## Results")[1].split("## Findings")[0].strip().splitlines()
    assert len(table) == 5 and all(cell.strip() for line in table[2:] for cell in line.strip("|").split("|"))
    for name in ("map_vs_params", "map_vs_flops", "latency_vs_flops", "kept_filters", "samples"):
        assert (run / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "results.csv").read_text().count("\n") == 4
    # a rerun finds every cell done: same results, no new training
    stamp = (run / "cells" / "global-0.6" / "result.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, ["experiment", str(path), "--quiet"], catch_exceptions=False)
    assert again.exit_code == 0 and (run / "cells" / "global-0.6" / "result.json").stat().st_mtime_ns == stamp
