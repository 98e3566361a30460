"""Wall time of a two-cell sweep run serially and as Ray tasks on a local cluster of two one-CPU
workers, and what dispatching costs.

    python benchmarks/ray_dispatch.py [--data data/synth] [--out runs/ray-dispatch.json]

The sweep: a seeded random yolov2-tiny (64 px, width 0.25) as the given baseline, L1 filter pruning
50 % and global unstructured 60 %, no retraining, float export; the serial run and the Ray run write
their own folders (a temporary one). Written: both wall times (the Ray one from ``ray.init``, which
is also given alone) and the host's matmul GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--out", default="runs/ray-dispatch.json")
    args = parser.parse_args(argv)

    import numpy as np
    import ray

    import run  # benchmarks/run.py, beside this script: the matmul peak
    from kprune import detectors
    from kprune.experiment import Experiment, ExperimentConfig, run_on_ray
    from kprune.models.io import save_model

    gflops = run._matmul_peak(5)["gflops_best"]
    folder = Path(tempfile.mkdtemp(prefix="ray-dispatch-"))
    model = detectors.build("yolov2-tiny", input_size=64, width=0.25, classes=5)
    rng = np.random.default_rng(2)
    for weight in model.weights:
        values = rng.normal(0.0, 0.05, weight.shape).astype(np.float32)
        weight.assign(np.abs(values) + 1e-4 if "moving_variance" in weight.name else values)
    save_model(model, folder / "given.keras")

    def config(out):
        return ExperimentConfig(
            name="ray-dispatch", dataset=args.data, baseline={"model": str(folder / "given.keras")},
            sweep=[{"method": "filters", "allocation": "uniform", "criterion": "l1", "ratios": [0.5], "epochs": 0},
                   {"method": "global", "ratios": [0.6], "epochs": 0}],
            retrain={"epochs": 0}, export=["none"], latency_runs=5, latency_threads=[2], samples=0,
            ray={"cpus": 1}, out=str(folder / out))

    start = time.perf_counter()
    Experiment(config("serial"), progress=False, log=lambda line: None).run()
    serial = time.perf_counter() - start
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    started = time.perf_counter() - start
    try:
        run_on_ray(config("ray"), log=lambda line: None)
    finally:
        ray.shutdown()
    on_ray = time.perf_counter() - start
    result = {"host_matmul_gflops": gflops, "cpus": os.cpu_count(), "serial_seconds": serial,
              "ray_seconds": on_ray, "ray_init_seconds": started, "folder": str(folder)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
