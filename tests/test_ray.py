"""Experiment parts dispatched as Ray tasks on a local two-worker cluster report what a serial run
reports, a cell whose worker was killed included."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")


def kill_a_cell_worker(baseline_done: Path, stop: threading.Event, killed: list) -> None:
    """Once the baseline is done, SIGKILL the first Ray worker process running a part (its process
    title is ``ray::_run_part``): a cell's worker dies mid-task."""
    while not stop.is_set() and not baseline_done.is_file():
        time.sleep(0.05)
    while not stop.is_set() and not killed:
        for entry in Path("/proc").iterdir():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if entry.name.isdigit() and title.startswith(b"ray::_run_part"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
                break
        time.sleep(0.05)


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

    lines, killed, stop = [], [], threading.Event()
    killer = threading.Thread(target=kill_a_cell_worker, args=(tmp_path / "ray" / "baseline" / "result.json", stop, killed))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")  # two workers of one CPU
    try:
        killer.start()
        on_ray = run_on_ray(config("ray"), log=lines.append)
    finally:
        stop.set()
        killer.join()
        ray.shutdown()
    assert len(killed) == 1  # and the cell ran again (retries: 1) on a new worker
    assert lines[0] == "[ray] 1 baseline/compare part(s) on Ray: baseline"
    assert lines[2] == "[ray] 2 cell part(s) on Ray: filters-uniform-l1-0.5, global-0.6"
    assert sorted(line.split(":")[0] for line in lines[3:5]) == ["[ray] filters-uniform-l1-0.5", "[ray] global-0.6"]
    serial = Experiment(config("serial"), progress=False, log=lambda line: None).run()
    keys = ("label", "kind", "params", "nonzero_params", "flops", "map50", "coco_map", "none_map50")
    assert [[r[k] for k in keys] for r in on_ray["flat"]] == [[r[k] for k in keys] for r in serial["flat"]]
    assert [r["label"] for r in on_ray["flat"]] == ["baseline", "filters-uniform-l1-0.5", "global-0.6"]
    stored = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert stored["flat"] == json.loads(json.dumps(on_ray["flat"]))
