"""The wall time of an experiment's full sweep on one worker against N, from measured training speeds.

    python benchmarks/sweep_time.py [--experiment experiments/ssd_gradual_global.yaml]
        [--images 16551] [--workers 1 2 4 9] [--batch 4] [--steps 4] [--out runs/sweep-time.json]

Every training of the experiment is counted in epochs from its config: the baseline's training
config, each cell's retraining (rounds x epochs for the cells that prune in rounds) and the dense
controls the cells need. A training step of the baseline's model is timed here (random weights and
images, the family's loss) dense and filter-pruned at 25 / 50 / 75 % with each allocation of the
sweep, interleaved over two passes (the median step); a pruned model's epoch costs its measured step
time, a round of a gradual cell the dense-to-pruned time interpolated at that round's ratio (cubic
schedule). Evaluation, export and timing, which cost little beside training, are left out.

The schedule on N workers (one part per worker, Ray's dispatch): the baselines, then the cells
(longest first onto the worker free soonest), then the controls. Written: every part's epochs and
hours on this host, the totals for each N, with the baseline on one worker and spread over the N
(tf.distribute with perfect scaling: the bound), and the host's matmul GFLOP/s.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import time
from pathlib import Path


def makespan(hours, workers: int) -> float:
    """Longest-first list scheduling of independent parts on ``workers`` workers."""
    free = [0.0] * workers
    for h in sorted(hours, reverse=True):
        heapq.heapreplace(free, free[0] + h)
    return max(free) if hours else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="experiments/ssd_gradual_global.yaml")
    parser.add_argument("--images", type=int, default=16551, help="training images per epoch (VOC07+12 trainval)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 9])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="runs/sweep-time.json")
    args = parser.parse_args(argv)

    import numpy as np

    import run  # benchmarks/run.py, beside this script: the matmul peak
    from kprune import detectors
    from kprune._keras import keras
    from kprune.experiment import cells, control_label, load_config, training_values
    from kprune.prune.command import prune
    from kprune.prune.schedules import get_schedule
    from kprune.train.trainer import DetectorTrainer

    config = load_config(args.experiment)
    train = training_values(config.baseline)
    size, classes = train.get("input_size"), len(train.get("names") or []) or 20
    dense = detectors.build(train["model"], input_size=size, classes=classes)
    size = dense.input_shape[1]
    family = detectors.family_of(dense)
    sweep = cells(config)
    epochs = int(config.retrain.get("epochs", 4))
    ratios = sorted({c["ratio"] for c in sweep})

    def allocation_of(cell):
        return cell.get("allocation") or get_schedule(cell.get("schedule", "once")).allocation

    allocations = sorted({allocation_of(c) for c in sweep})

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.batch, size, size, 3)).astype(np.float32)
    boxes = np.tile(np.array([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]], np.float32), (args.batch, 1, 1))
    labels = np.tile(np.array([[1, 3]], np.int32), (args.batch, 1))

    def trainer(model):
        encoder = family.target_encoder(model)
        targets = encoder(boxes, labels)
        step = DetectorTrainer(model, family.loss(model))
        step.compile(optimizer=keras.optimizers.Adam(1e-4))
        step.train_on_batch(images, targets)  # traced
        return step, targets

    models = {("dense", 0.0): dense}
    for allocation in allocations:
        criterion = "l1-normalized" if allocation == "global" else "l1"  # the sweep's pairs
        for ratio in ratios:
            models[(allocation, ratio)], _, _ = prune(dense, "filters", ratio=ratio, allocation=allocation,
                                                      criterion=criterion, progress=False)
    steps = {key: trainer(model) for key, model in models.items()}
    times = {key: [] for key in models}
    for _ in range(2):  # interleaved passes: a slower moment of the host touches every model alike
        for key, (step, targets) in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step.train_on_batch(images, targets)
                times[key].append(time.perf_counter() - start)
    per_image = {key: statistics.median(t) / args.batch for key, t in times.items()}
    epoch_hours = {key: s * args.images / 3600 for key, s in per_image.items()}

    def pruned_hours(allocation, ratio):
        """An epoch at ``ratio``: measured, or interpolated between the measured ratios."""
        known = [(0.0, epoch_hours[("dense", 0.0)])] + [(r, epoch_hours[(allocation, r)]) for r in ratios]
        return float(np.interp(ratio, [r for r, _ in known], [h for _, h in known]))

    base_epochs = int(train.get("epochs", 10))
    parts = {"baseline": {"kind": "baseline", "epochs": base_epochs, "hours": base_epochs * epoch_hours[("dense", 0.0)]}}
    controls = set()
    for c in sweep:
        schedule = get_schedule(c.get("schedule", "once"))
        cell_epochs = int(c.get("epochs", epochs))
        # a cell of rounds fine-tunes after each (the model of that round's ratio); one of rounds
        # that stops on a drop is counted to its last round
        round_ratios = schedule.targets(c["ratio"], c.get("rounds")) if schedule.in_rounds else [c["ratio"]]
        hours = sum(cell_epochs * pruned_hours(allocation_of(c), r) for r in round_ratios)
        total = cell_epochs * len(round_ratios)
        parts[c["label"]] = {"kind": "cell", "epochs": total, "hours": hours}
        controls.add(total)
    for total in sorted(controls):
        parts[control_label(total)] = {"kind": "control", "epochs": total, "hours": total * epoch_hours[("dense", 0.0)]}

    def hours_of(kind):
        return [p["hours"] for p in parts.values() if p["kind"] == kind]

    schedule = {}
    for n in args.workers:
        rest = makespan(hours_of("cell"), n) + makespan(hours_of("control"), n)
        schedule[n] = {"baseline_on_one": sum(hours_of("baseline")) + rest,
                       "baseline_on_all": sum(hours_of("baseline")) / n + rest}
    result = {"experiment": args.experiment, "images_per_epoch": args.images, "input_size": size,
              "batch": args.batch, "seconds_per_image": {f"{a}-{r:g}": s for (a, r), s in per_image.items()},
              "parts": parts, "hours_by_workers": schedule, "gflops": run._matmul_peak(5)["gflops_best"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"seconds_per_image": result["seconds_per_image"], "hours_by_workers": schedule,
                      "gflops": result["gflops"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
