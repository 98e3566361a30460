"""Experiment parts dispatched as Ray tasks on a local two-worker cluster report what a serial run reports."""

import json

import pytest

ray = pytest.importorskip("ray")


@pytest.mark.distributed
def test_a_two_cell_sweep_on_a_local_ray_cluster_reports_as_a_serial_run(tmp_path, tiny_synth_data):
    from kprune.darknet.builder import build_model
    from kprune.experiment import Experiment, ExperimentConfig, run_on_ray
    from kprune.models.io import save_model
    from tests.conftest import cfg_path, randomize

    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=2, scale=0.05)
    save_model(model, tmp_path / "given.keras")

    def config(out):
        return ExperimentConfig(
            name="ray", dataset=tiny_synth_data, baseline={"model": str(tmp_path / "given.keras")},
            sweep=[{"method": "filters", "allocation": "uniform", "criterion": "l1", "ratios": [0.5], "epochs": 0},
                   {"method": "global", "ratios": [0.6], "epochs": 0}],
            retrain={"epochs": 0}, export=["none"], latency_runs=1, latency_threads=[2], samples=0,
            ray={"cpus": 1, "retries": 1}, out=str(tmp_path / out))

    lines = []
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")  # two workers of one CPU
    try:
        on_ray = run_on_ray(config("ray"), log=lines.append)
    finally:
        ray.shutdown()
    assert lines[0] == "[ray] 1 baseline/compare part(s) on Ray: baseline"
    assert lines[2] == "[ray] 2 cell part(s) on Ray: filters-uniform-l1-0.5, global-0.6"
    assert sorted(line.split(":")[0] for line in lines[3:5]) == ["[ray] filters-uniform-l1-0.5", "[ray] global-0.6"]
    serial = Experiment(config("serial"), progress=False, log=lambda line: None).run()
    keys = ("label", "kind", "params", "nonzero_params", "flops", "map50", "coco_map", "none_map50")
    assert [[r[k] for k in keys] for r in on_ray["flat"]] == [[r[k] for k in keys] for r in serial["flat"]]
    assert [r["label"] for r in on_ray["flat"]] == ["baseline", "filters-uniform-l1-0.5", "global-0.6"]
    stored = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert stored["flat"] == json.loads(json.dumps(on_ray["flat"]))
