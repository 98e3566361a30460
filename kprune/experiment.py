"""``kprune experiment CONFIG.yaml``: a pruning sweep, from the baseline to the report.

A config (a small diff from a base, see :mod:`kprune.config`) names a dataset, a baseline (trained
by a training config, or an existing ``.keras`` model) and a sweep: for each method x ratio, a
*cell* runs prune -> evaluate without retraining -> retrain -> evaluate -> export -> measure; at the
end every model is timed, side by side. A cell loads the baseline once and keeps its model in memory
from pruning to measuring; it saves ``final.keras`` once, beside the exported ``.tflite`` files.
Every cell writes ``cells/<label>/result.json`` last, so a rerun of the same config skips the
cells already done (and the baseline, once trained); a quantization added to ``export`` (or a ``qat``
added) afterwards is exported from the stored ``final.keras`` of every part done, nothing is trained
again. The run folder then gets ``results.json``,
``results.csv``, ``report.md`` and the plots (:mod:`kprune.report.plots`).

Config keys (see :class:`ExperimentConfig`)::

    name: demo
    dataset: synth                       # or a converted dataset folder
    baseline: {model: path.keras}        # or {train: {...}}, or {config: train.yaml, train: {...changes}};
                                         # model and config together: the model, retrained with the config's settings
    compare:                             # other trainings reported beside the baseline, not pruned
      head: {config: train.yaml, train: {mode: head}}
    sweep:
      - {method: filters, allocation: uniform, criterion: l1, ratios: [0.3, 0.5]}
      - {method: filters, schedule: gradual, rounds: 3, ratios: [0.5]}
      - {method: global, ratios: [0.5, 0.8], epochs: 2}   # unstructured; its own retraining epochs
      - {method: filters, allocation: global, criterion: l1-normalized, remove_flops: [0.5]}  # a FLOPs budget
      - {method: filters, ratios: [0.4], reconstruct: true, distill: 1.0}   # recoveries of this entry only
      - {method: filters, ratios: [0.4], distill: 1.0, features: [conv_16]}  # + feature imitation
      - {method: filters, allocation: sensitivity, sensitivity: model.sensitivity/sensitivity.json,
         target_latency: [20, 15], runtime: tflite, threads: 1}               # latency budgets (ms)
    retrain: {epochs: 4, lr: 0.001, batch_size: 8}     # + distill: {teacher: dense, weight: 1.0}
    export: [none, int8]                 # TFLite quantizations of the baseline and every cell
    qat: {epochs: 2, lr: 0.0001}         # also an int8 file after QAT (export int8-qat), beside the PTQ int8
    latency_runs: 20
    latency_threads: [1, 2]
    samples: 2                           # validation images drawn before / after pruning
    seeds: 1                             # every training (baseline, controls, cells, compare) N times
    control: true                        # dense controls: the baseline retrained as long as the cells
    spread: null                         # std of one run's mAP@0.5, measured elsewhere; used with 1 seed
    out: runs/demo

Retraining uses the baseline's training settings (loss, augmentation, batch size, batch-norm
handling) with the ``retrain`` keys on top. Prunings that already train (the ``tfmot-*`` methods,
the ``gradual`` and ``iterative`` schedules) have no "without retraining" figure; their fine-tuning
uses the ``retrain`` settings.

Controls and seeds (Liu et al., "Rethinking the value of network pruning"): a pruned model that was
retrained for E epochs is compared with the *dense control*, the baseline retrained for the same E
epochs with the same settings (``controls/dense-Eep``); a cell without retraining is compared with
the baseline itself. The round schedules count the epochs of all the rounds their model went
through (their learning-rate schedule restarts every round, the control's does not). With
``seeds: N`` every training runs N times, with the training config's ``seed`` plus 0 .. N-1 (seed k's
cells prune seed k's baseline; a given baseline model is the same for all); folders of seed k > 0
end in ``.seedK``. The report gives mean ± standard deviation and calls a change better or worse
only when it is larger than the spread (:mod:`kprune.report.stats`).

Parts (:meth:`Experiment.parts`): every baseline, ``compare`` training, cell and dense control is a
part with a name (its folder's): ``kprune experiment CONFIG --list`` prints them, ``--cell NAME``
runs one (after the baseline it needs, computed once and shared: a lock file makes a second process
wait for the first one's baseline instead of training its own), and ``--report`` writes the report of
whatever parts are done. A part's result is written atomically (``result.json``, last), so parts run
in parallel never see or leave half a result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import time
from dataclasses import field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

from typing_extensions import Required, TypedDict

from kprune.config import Float, Int, build, dump_yaml, read_yaml, schema, strict_keys
from kprune.evaluate import evaluate_loaded
from kprune.export.command import export
from kprune.export.qat import qat_options
from kprune.export.tflite import QUANT_MODES
from kprune.fileio import atomic_path, write_json_atomic
from kprune.models.io import load_model, save_model
from kprune.models.litert import TFLiteRunner
from kprune.prune.command import check_options, dense_teacher, prune, retrain, uses_data
from kprune.prune.methods import METHODS, get_method
from kprune.prune.recovery import RECOVERIES
from kprune.prune.schedules import get_schedule
from kprune.prune.sensitivity import read_sensitivity
from kprune.report.command import measure_model
from kprune.report.experiment import write_report
from kprune.report.latency import side_by_side
from kprune.report.runtimes import get_runtime
from kprune.train import TrainConfig, resolve_dataset, train
from kprune.train.config import dense_distillation



@strict_keys
class SweepEntry(TypedDict, total=False):
    """One entry of ``sweep:`` (see the module docstring); every key optional but ``method``."""

    method: str
    ratios: List[Float]
    remove_flops: List[Float]  # FLOPs budgets, one cell each
    target_latency: List[Float]  # latency budgets in ms, one cell each
    runtime: str
    threads: Int
    sensitivity: str
    reconstruct: bool
    distill: Float
    features: List[str]  # with distill: layers whose attention maps the retraining imitates
    allocation: str
    schedule: str
    criterion: str
    scope: str
    rounds: Int
    max_drop: Float
    threshold: Float
    label: str
    round_to: Int
    include_outputs: bool
    epochs: Int


@strict_keys
class TrainingSpec(TypedDict, total=False):
    """A training: ``train:`` settings and / or a training ``config:`` file (null removes a key of a base);
    for the baseline, also (or instead) an existing ``model:``."""

    model: Optional[str]
    config: Optional[str]
    train: Optional[Dict[str, object]]


@strict_keys
class QatSpec(TypedDict, total=False):
    """``qat:``: every model of the experiment also exported as int8 after quantization-aware
    training (:func:`kprune.export.qat.quantize_aware_train`) with the baseline's batch size, loss and
    augmentation; its file and mAP are ``export["int8-qat"]`` beside the post-training ``int8``."""

    epochs: Required[Int]
    lr: Float  # default 1e-4 (kprune.export.qat.QAT_DEFAULTS)


@strict_keys
class RaySpec(TypedDict, total=False):
    """``ray:``: what each part asks of a Ray cluster (``kprune experiment --ray``)."""

    cpus: Float  # default 1
    gpus: Float  # default 0; give 1 to run each part on its own GPU
    retries: Int  # a part whose worker died runs again up to this many times; default 2


BUDGETS = ("remove_flops", "target_latency")  # sweep keys whose values are budgets, each a cell
TRAINING_SPECS = ({"train"}, {"config"}, {"config", "train"})


@schema
class ExperimentConfig:
    """A sweep; saved as ``experiment.yaml`` in the run folder."""

    name: str = "experiment"
    dataset: str = "synth"
    baseline: TrainingSpec = field(default_factory=dict)
    compare: Dict[str, TrainingSpec] = field(default_factory=dict)
    sweep: List[SweepEntry] = field(default_factory=list)
    retrain: Dict[str, object] = field(default_factory=lambda: {"epochs": 4})
    export: List[str] = field(default_factory=lambda: ["none", "int8"])
    qat: Optional[QatSpec] = None
    ray: RaySpec = field(default_factory=dict)
    latency_runs: Int = 20
    latency_threads: List[Int] = field(default_factory=lambda: [1, 2])
    samples: Int = 2
    seeds: Int = 1
    control: bool = True
    spread: Optional[Float] = None
    out: str = "runs/experiment"

    def __post_init__(self):
        # a config based on another removes a key of the base's baseline by setting it to null
        self.baseline = {k: v for k, v in (self.baseline or {}).items() if v is not None}
        if set(self.baseline) - {"model"} not in (set(), *TRAINING_SPECS) or not self.baseline:
            raise ValueError("experiment baseline: give either {model: MODEL.keras} or a training config "
                             "({train: {...}} and / or {config: TRAIN.yaml}), or both: the model, and the "
                             "training settings retraining should use")
        for label, spec in self.compare.items():
            if set(spec) not in TRAINING_SPECS:
                raise ValueError(f"experiment compare {label!r}: give a training config "
                                 "({train: {...}} and / or {config: TRAIN.yaml})")
        if not self.sweep:
            raise ValueError("experiment sweep: list at least one method")
        for k, entry in enumerate(self.sweep):
            try:
                check_entry(entry)
            except ValueError as error:
                raise ValueError(f"sweep entry {k}: {error}") from None
        bad = [q for q in self.export if q not in QUANT_MODES]
        if bad:
            raise ValueError(f"experiment export {bad}: choose from {', '.join(QUANT_MODES)}")
        if "none" not in self.export:
            self.export = ["none", *self.export]  # latency and the int8 comparison need the float file
        if self.qat is not None and (self.qat["epochs"] < 1 or self.qat.get("lr", 1e-4) <= 0):
            raise ValueError(f"experiment qat {self.qat!r}: epochs >= 1 and lr > 0")
        if 2 not in self.latency_threads:
            raise ValueError(f"latency_threads {self.latency_threads}: must include 2 (the report compares at 2)")
        if self.latency_runs < 1:
            raise ValueError(f"latency_runs {self.latency_runs}: need at least 1")
        if self.seeds < 1:
            raise ValueError(f"experiment seeds {self.seeds!r}: give the number of runs of every training, >= 1")
        if self.spread is not None and not 0 <= self.spread < 1:
            raise ValueError(f"experiment spread {self.spread!r}: give the standard deviation of one run's "
                             "mAP@0.5, a number in [0, 1), or null")


def check_entry(entry: dict) -> None:
    """Refuse a sweep entry with unknown keys or options that do not fit together.

    Raises:
        ValueError: what :func:`kprune.prune.command.check_options` refuses for any of its cells, an
            unknown key, none or several of ratios and budgets, a runtime without a latency budget,
            or a value a recovery option (:data:`kprune.prune.recovery.RECOVERIES`) does not take.
    """
    method = entry.get("method")
    if method not in METHODS:
        raise ValueError(f"method {method!r}; choose one of {', '.join(METHODS)}")
    given = [key for key in ("ratios", *BUDGETS) if entry.get(key)]
    if len(given) > 1:
        raise ValueError(f"give one of ratios, remove_flops (FLOPs budgets) and target_latency (milliseconds), "
                         f"not {' and '.join(given)}")
    if not given and method != "threshold":
        raise ValueError("give ratios: [...] (or, for filters, remove_flops: [...] or target_latency: [...])")
    options = dict(allocation=entry.get("allocation"), schedule=entry.get("schedule", "once"), data="data", epochs=1,
                   rounds=entry.get("rounds"), max_drop=entry.get("max_drop"), criterion=entry.get("criterion"),
                   reconstruct=bool(entry.get("reconstruct")),
                   sensitivity={} if entry.get("sensitivity") else None)  # the file is read when the cell runs
    for key in BUDGETS:
        for budget in entry.get(key) or []:
            check_options(method, **options, **{key: budget})
    if entry.get("ratios") or method == "threshold":
        check_options(method, ratio=0.5, threshold=entry.get("threshold", 0.5), **options)
    if entry.get("target_latency"):
        get_runtime(entry.get("runtime", "tflite"), entry.get("threads", 1))
    elif "runtime" in entry or "threads" in entry:
        raise ValueError("runtime and threads belong to target_latency budgets")
    for recovery in RECOVERIES.values():
        if recovery.key in entry:
            recovery.check(entry[recovery.key])
    if entry.get("features") and not entry.get("distill"):
        raise ValueError("features (layers to imitate) go with distill: W > 0, the distillation they belong to")


def load_config(path: str) -> ExperimentConfig:
    """Read and validate an experiment config (``base:`` inheritance, unknown keys refused)."""
    values = read_yaml(path)
    folder = os.path.dirname(str(path))

    def relative(spec):  # a training config named relative to the experiment file, like ``base:``
        if isinstance(spec, dict) and isinstance(spec.get("config"), str) and not os.path.isabs(spec["config"]):
            return {**spec, "config": os.path.join(folder, spec["config"])}
        return spec

    if "baseline" in values:
        values["baseline"] = relative(values["baseline"])
    if isinstance(values.get("compare"), dict):
        values["compare"] = {label: relative(spec) for label, spec in values["compare"].items()}
    return build(ExperimentConfig, values, str(path))


def cells(config: ExperimentConfig) -> List[dict]:
    """The sweep expanded: one dict per (entry, ratio) with a unique ``label``."""
    out = []
    for entry in config.sweep:
        base = {k: v for k, v in entry.items() if k not in ("ratios", *BUDGETS)}
        name = entry.get("label") or "-".join(
            str(v) for v in (entry["method"], entry.get("schedule"), entry.get("allocation"), entry.get("criterion"),
                             entry.get("scope")) if v)
        for budget in entry.get("remove_flops") or []:  # the ratio is found when the cell runs
            out.append({**base, "ratio": None, "remove_flops": budget, "family": name, "label": f"{name}-flops{budget:g}"})
        for budget in entry.get("target_latency") or []:
            out.append({**base, "ratio": None, "target_latency": budget, "family": name, "label": f"{name}-{budget:g}ms"})
        for ratio in entry.get("ratios") or ([] if any(entry.get(key) for key in BUDGETS) else [None]):
            value = entry.get("threshold") if ratio is None else ratio
            out.append({**base, "ratio": ratio, "family": name, "label": f"{name}-{value if value is None else format(value, 'g')}"})
    labels = [c["label"] for c in out]
    duplicated = sorted({x for x in labels if labels.count(x) > 1})
    if duplicated:
        raise ValueError(f"experiment sweep: cells {duplicated} appear twice (give entries a label)")
    return out


def training_values(spec: dict) -> dict:
    """The training config values of a baseline or ``compare`` spec: ``config`` (read with its
    ``base:`` chain) with ``train`` on top; empty for ``{model: ...}``."""
    values = dict(read_yaml(spec["config"])) if "config" in spec else {}
    values.update(spec.get("train") or {})
    return values


def retrain_options(config: ExperimentConfig) -> dict:
    """Retraining settings: the baseline's, without what makes a new model or run, then ``retrain``."""
    skip = {"dataset", "model", "init", "cfg", "weights", "input_size", "width", "mode", "class_map", "epochs",
            "out", "pretrain_epochs", "pretrain_crop", "lr", "warmup_epochs", "decay_epochs", "early_stopping",
            "eval_every", "steps_per_epoch", "anchors", "final_size", "names", "bn_formula"}
    options = {k: v for k, v in training_values(config.baseline).items() if k not in skip}
    options.update({k: v for k, v in config.retrain.items() if k != "epochs"})
    return options


def _done(path: Path) -> Optional[dict]:
    """A stored result, or None; results written before seeds and controls read as seed 0's."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    result.setdefault("kind", "baseline" if result.get("label") == "baseline" else "cell")
    result.setdefault("seed_index", 0)
    return result


class Experiment:
    """One sweep in its run folder; :meth:`run` does whatever is not done yet."""

    def __init__(self, config: ExperimentConfig, progress: bool = True, log=print):
        self.config, self.progress, self.log = config, progress, log
        self.out = Path(config.out)
        self.data = resolve_dataset(config.dataset)
        self.cells = cells(config)
        self.first_seed = int(retrain_options(config).get("seed", 0))
        self.given = "model" in config.baseline  # a baseline model, the same for every seed

    def seed(self, k: int) -> int:
        """The training seed of run ``k`` (0 .. seeds - 1)."""
        return self.first_seed + k

    def _options(self, k: int, cell: Optional[dict] = None) -> dict:
        """Retraining settings of seed ``k``; a cell's own ``distill`` weight replaces ``retrain``'s."""
        options = {**retrain_options(self.config), "seed": self.seed(k)}
        weight = (cell or {}).get("distill")
        if weight is not None:
            options["distill"] = dense_distillation(weight, options.get("distill"))
        if (cell or {}).get("features"):
            options["distill"] = {**options["distill"], "features": list(cell["features"])}
        return options

    def _train(self, spec: dict, run_dir: Path, what: str, k: int) -> dict:
        values = {**training_values(spec), "dataset": self.data, "out": str(run_dir)}
        values["seed"] = int(values.get("seed", 0)) + k
        self.log(f"[{self.config.name}] training {what} in {run_dir}")
        return train(build(TrainConfig, values, f"experiment {what}"), progress=self.progress)

    def compared(self, label: str, k: int = 0) -> dict:
        """Train and evaluate one ``compare`` entry with seed ``k`` (or return its stored result)."""
        folder = self.out / "compare" / (label + _suffix(k))
        done = _done(folder / "result.json")
        if done:
            return done
        spec = self.config.compare[label]
        values = training_values(spec)
        metrics = self._train(spec, folder / "run", label, k)
        result = {"label": label, "mode": values.get("mode", "full"), "epochs": metrics.get("epochs"),
                  "seed_index": k, "train_seconds": metrics.get("train_seconds"), "map50": metrics["map50"],
                  "map50_11pt": metrics.get("map50_11pt"), "coco_map": metrics["coco_map"],
                  "model": str(folder / "run" / "final.keras")}
        folder.mkdir(parents=True, exist_ok=True)
        return self._write(folder, result)

    def _baseline_folder(self, k: int) -> Path:
        return self.out / ("baseline" if self.given else "baseline" + _suffix(k))

    def baseline(self, k: int = 0) -> dict:
        """Train (with seed ``k``) or take the baseline model, then evaluate, export and measure it
        (once); its ``model.keras`` is what seed ``k``'s cells prune and its controls retrain."""
        folder = self._baseline_folder(k)
        done = self._stored(folder)
        if done:
            return done
        folder.mkdir(parents=True, exist_ok=True)
        if self.given:
            model = load_model(str(self.config.baseline["model"]))
            trained = None
        else:
            trained = self._train(self.config.baseline, folder / "run", "baseline" + _suffix(k), k)
            model = load_model(str(folder / "run" / "final.keras"))
        result = {"label": "baseline", "family": "baseline", "kind": "baseline", "ratio": 0.0,
                  "seed_index": 0 if self.given else k, "seed": None if self.given else self.seed(k),
                  "train_epochs": 0, "trained": trained}
        result.update(self._finish(folder, model))
        _copy(folder / "final.keras", folder / "model.keras")
        return self._write(folder, result)

    def cell(self, cell: dict, k: int = 0) -> dict:
        """Run one cell with seed ``k`` (or return its stored result): seed ``k``'s baseline is
        loaded once, and pruned, evaluated, retrained, saved (``final.keras``), exported and measured
        in memory."""
        folder = self.out / "cells" / (cell["label"] + _suffix(k))
        epochs, trains_itself = self._epochs(cell), _trains_itself(cell)
        done = self._stored(folder)
        if done:
            if "train_epochs" not in done:  # stored before controls: the one-shot epochs, rounds unknown
                done["train_epochs"] = 0 if trains_itself else epochs
                done["control"] = None if trains_itself else control_label(epochs)
            return done
        folder.mkdir(parents=True, exist_ok=True)
        options = {k_: cell[k_] for k_ in ("allocation", "schedule", "criterion", "scope", "rounds", "max_drop", "threshold",
                                           "round_to", "include_outputs", "remove_flops", "target_latency",
                                           "reconstruct")
                   if k_ in cell}
        if "target_latency" in cell:
            options["runtime"] = get_runtime(cell.get("runtime", "tflite"), cell.get("threads", 1))
        if "sensitivity" in cell:
            options["sensitivity"] = read_sensitivity(cell["sensitivity"])
        start = time.perf_counter()
        self.log(f"[{self.config.name}] {cell['label'] + _suffix(k)}: pruning")
        scored_on_data = uses_data(cell.get("criterion"), bool(cell.get("reconstruct")))
        dense = load_model(str(self._baseline_folder(k) / "model.keras"))
        train_options = self._options(k, cell)
        method = get_method(cell["method"])
        if train_options.get("distribution", "default") != "default":
            # tfmot's wrappers refuse several replicas, and a filter-pruned model's synchronised batch
            # norm issued its collectives in different orders on the replicas (TensorFlow 2.21); cells
            # are many and independent: run them side by side (--ray) rather than one over devices
            self.log(f"[{self.config.name}] {cell['label'] + _suffix(k)}: trains on one device (cells do not "
                     f"use the {train_options['distribution']} strategy; --ray runs cells side by side)")
            train_options["distribution"] = "default"
        model, report, history = prune(dense, cell["method"],
                                       ratio=cell["ratio"], data=self.data if trains_itself or scored_on_data else None,
                                       epochs=max(epochs, 1) if trains_itself else None,
                                       train_options=train_options, run_dir=str(folder / "pruned.run"),
                                       progress=self.progress, **options)
        if history is not None:
            write_json_atomic(folder / "pruned.history.json", history)
        result = {"label": cell["label"], "family": cell["family"], "kind": "cell",
                  "ratio": report.get("ratio", cell["ratio"]), "remove_flops": cell.get("remove_flops"),
                  "method": cell["method"], "allocation": cell.get("allocation"), "schedule": cell.get("schedule"),
                  "seed_index": k,
                  "seed": self.seed(k), "prune_seconds": time.perf_counter() - start,
                  "layers": report["layers"], "rounds": report.get("rounds"),
                  "reconstruction": report.get("reconstruction"), "target_latency": cell.get("target_latency"),
                  "latency_budget": report.get("latency")}
        if trains_itself:
            result["map50_pruned"] = None
            rounds = report.get("rounds")
            # the epochs the returned model went through: the rounds kept, or one training (tfmot)
            result["train_epochs"] = (max(epochs, 1) * (len(rounds) - bool(report.get("stopped")))
                                      if rounds is not None else max(epochs, 1))
        else:
            result["map50_pruned"] = evaluate_loaded(model, self.data)["map50"]
            result["train_epochs"] = epochs
            if epochs > 0:
                self.log(f"[{self.config.name}] {cell['label'] + _suffix(k)}: retraining {epochs} epochs")
                start = time.perf_counter()
                model, _ = retrain(model, str(folder / "run"), self.data, epochs, train_options,
                                   self.progress, keep_sparsity=method.keeps_sparsity,
                                   teacher=dense_teacher(dense, train_options))
                result["train_seconds"] = time.perf_counter() - start
        result["retrained"] = trains_itself or epochs > 0
        result["control"] = control_label(result["train_epochs"]) if self.config.control else None
        result.update(self._finish(folder, model))
        return self._write(folder, result)

    def control(self, epochs: int, k: int = 0) -> dict:
        """The dense control of ``epochs`` with seed ``k`` (or its stored result): seed ``k``'s
        baseline retrained for ``epochs`` with the cells' retraining settings, then evaluated,
        exported and measured like a cell."""
        label = control_label(epochs)
        if label == "baseline":
            return self.baseline(k)
        folder = self.out / "controls" / (label + _suffix(k))
        done = self._stored(folder)
        if done:
            return done
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"[{self.config.name}] {label + _suffix(k)}: retraining the baseline {epochs} epochs")
        start = time.perf_counter()
        dense = load_model(str(self._baseline_folder(k) / "model.keras"))
        model, _ = retrain(dense, str(folder / "run"), self.data, epochs, self._options(k), self.progress,
                           teacher=dense_teacher(dense, self._options(k)))
        result = {"label": label, "family": "dense control", "kind": "control", "ratio": 0.0, "seed_index": k,
                  "seed": self.seed(k), "train_epochs": epochs, "train_seconds": time.perf_counter() - start,
                  "retrained": True, "map50_pruned": None}
        result.update(self._finish(folder, model))
        return self._write(folder, result)

    def _finish(self, folder: Path, model) -> dict:
        """Save a cell's final model as ``final.keras``, then evaluate, export (every quantization;
        each file evaluated as LiteRT runs it) and measure it, all from memory."""
        final = folder / "final.keras"
        save_model(model, final)
        scores = evaluate_loaded(model, self.data, source=str(final))
        result = {"model": str(final), "map50": scores["map50"], "coco_map": scores["coco_map"], "export": {}}
        for quant in self._quantizations():
            result["export"][quant] = self._export(folder, model, quant)
        # sizes of final.keras and of the float final.tflite written above; latency comes after the
        # cells, side by side (see latency())
        result["measure"] = measure_model(str(final), None, threads=(), model=model)
        return result

    def _quantizations(self) -> List[str]:
        """The TFLite files every model of the experiment gets: ``export``'s, and int8-qat with ``qat``."""
        return [*self.config.export, *(["int8-qat"] if self.config.qat else [])]

    def _export(self, folder: Path, model, quant: str) -> dict:
        """Export ``model`` as ``quant`` into ``folder`` and evaluate the file as LiteRT runs it."""
        out = folder / ("final.tflite" if quant == "none" else f"final-{quant}.tflite")
        if quant == "int8-qat":  # QAT options: the baseline's batch, loss and augmentation, qat's epochs and lr
            options = qat_options(training_values(self.config.baseline), lr=self.config.qat.get("lr"))
            exported = export(model, str(out), "tflite", "int8", self.data, qat_epochs=self.config.qat["epochs"],
                              qat_options=options)
        else:
            exported = export(model, str(out), "tflite", quant, self.data if quant == "int8" else None)
        entry = {"bytes": exported["bytes"], "max_abs_diff": exported["check"]["max_abs_diff"]}
        runner = TFLiteRunner(out.read_bytes(), model)  # the file as written
        entry["map50"] = evaluate_loaded(model, self.data, predict=runner, source=str(out))["map50"]
        return entry

    def _stored(self, folder: Path) -> Optional[dict]:
        """A part's stored result (or None), completed with the quantizations ``export`` and ``qat``
        ask for that it lacks: an entry added to ``export`` after a run exports the saved
        ``final.keras`` of every part done, without training anything again."""
        done = _done(folder / "result.json")
        if done is None:
            return None
        missing = [q for q in self._quantizations() if q not in done.setdefault("export", {})]
        if missing:
            self.log(f"[{self.config.name}] {folder.name}: exporting {', '.join(missing)} from its final.keras")
            model = load_model(str(folder / "final.keras"))
            for quant in missing:
                done["export"][quant] = self._export(folder, model, quant)
            self._write(folder, done)
        return done

    def latency(self, rows: List[dict]) -> None:
        """Time every architecture of the sweep side by side — the baseline and each cell of the
        first seed, Keras, the float TFLite file and (when ``export`` has int8) the int8 file, at each
        thread count, runs interleaved across the models — and put the figures into the rows (other
        seeds' models are the same architecture: they take their cell's figures; a dense control
        takes the baseline's). Measured anew on every run of the experiment, so that all models
        share the same conditions."""
        timed = [r for r in rows if r["kind"] != "control" and r.get("seed_index", 0) == 0]
        self.log(f"[{self.config.name}] timing {len(timed)} models side by side")
        models = {r["model"]: (Path(r["model"]).with_suffix(".tflite").read_bytes(), load_model(r["model"]))
                  for r in timed}
        int8 = ({r["model"]: (Path(r["model"]).parent / "final-int8.tflite").read_bytes() for r in timed}
                if "int8" in self.config.export else None)
        latency = side_by_side(models, self.config.latency_threads, self.config.latency_runs, int8=int8)
        by_label = {r["label"]: latency[r["model"]] for r in timed}
        for r in rows:
            r["measure"]["latency"] = by_label["baseline" if r["kind"] == "control" else r["label"]]

    def _write(self, folder: Path, result: dict) -> dict:
        write_json_atomic(folder / "result.json", result)
        return result

    def _epochs(self, cell: dict) -> int:
        """The retraining epochs of a cell (its own, or ``retrain``'s)."""
        return int(cell.get("epochs", self.config.retrain.get("epochs", 0)))

    def _control_epochs(self, cell: dict, k: int) -> Optional[int]:
        """The epochs of the dense control a cell of seed ``k`` is compared with (0: the baseline
        itself), or None while unknown: a cell that trains in rounds knows them once it has run."""
        done = _done(self.out / "cells" / (cell["label"] + _suffix(k)) / "result.json")
        if done is not None:
            return int(done["train_epochs"])
        return None if _trains_itself(cell) else self._epochs(cell)

    @contextlib.contextmanager
    def _baseline_lock(self, k: int):
        """Held while seed ``k``'s baseline is trained or read, across processes (parts of one
        experiment run in parallel share the run folder)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f".baseline{_suffix(k)}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _shared_baseline(self, k: int) -> dict:
        with self._baseline_lock(k):
            return self.baseline(k)

    def _after_baseline(self, run: Callable[..., dict], k: int, *args) -> dict:
        self._shared_baseline(k)
        return run(*args, k)

    def parts(self) -> Dict[str, "Part"]:
        """Every part of the experiment that runs on its own, by name (its folder's name), in the
        order :meth:`run` runs them: the ``compare`` trainings, then per seed the baseline, the cells
        and the dense controls whose epochs are known (see :meth:`_control_epochs`).

        Raises:
            ValueError: two parts share a name (a ``compare`` label that is also a cell's).
        """
        found: Dict[str, Part] = {}

        def add(name: str, kind: str, what: str, folder: Path, run: Callable[[], dict]) -> None:
            if name in found:
                raise ValueError(f"experiment {self.config.name!r}: two parts are named {name!r}; give the "
                                 f"compare entry or the sweep entry another label")
            found[name] = Part(name, kind, what, folder, run)

        seeds = range(self.config.seeds)
        for label in self.config.compare:
            for k in seeds:
                add(label + _suffix(k), "compare", f"training compared with the baseline, seed index {k}",
                    self.out / "compare" / (label + _suffix(k)), functools.partial(self.compared, label, k))
        for k in seeds:
            seed = "the given model" if self.given else f"seed index {k}"
            if k == 0 or not self.given:
                folder = self._baseline_folder(k)
                add(folder.name, "baseline", f"baseline, {seed}", folder, functools.partial(self._shared_baseline, k))
            controls = set()
            for cell in self.cells:
                name = cell["label"] + _suffix(k)
                what = ", ".join(f"{key} {cell[key]}" for key in ("method", "allocation", "criterion", "schedule",
                                                                   "ratio", "remove_flops", "target_latency")
                                 if cell.get(key) is not None)
                add(name, "cell", f"{what}; prunes the baseline of {seed}", self.out / "cells" / name,
                    functools.partial(self._after_baseline, self.cell, k, cell))
                epochs = self._control_epochs(cell, k)
                if self.config.control and epochs:
                    controls.add(epochs)
            for epochs in sorted(controls):
                name = control_label(epochs) + _suffix(k)
                add(name, "control", f"dense control: the baseline of {seed} retrained {epochs} epochs",
                    self.out / "controls" / name, functools.partial(self._after_baseline, self.control, k, epochs))
        return found

    def save_config(self) -> None:
        """The config beside the results it produces (``experiment.yaml`` in the run folder)."""
        self.out.mkdir(parents=True, exist_ok=True)
        dump_yaml(dataclasses.asdict(self.config), self.out / "experiment.yaml")

    def run_part(self, name: str) -> dict:
        """Run the part ``name`` (:meth:`parts`) after the baseline it needs, or return its stored result.

        Raises:
            ValueError: no part has that name (the message lists them).
        """
        parts = self.parts()
        if name not in parts:
            raise ValueError(f"experiment {self.config.name!r} has no part {name!r}; its parts: {', '.join(parts)}")
        self.save_config()
        return parts[name].run()

    def report(self) -> dict:
        """Results, plots and report of the parts that are done (timing the models side by side
        anew); returns the results.

        Raises:
            ValueError: the baseline is not done yet.
        """
        parts = self.parts()  # the controls of the cells done are known
        done = {name: _done(part.folder / "result.json") if part.kind == "compare" else self._stored(part.folder)
                for name, part in parts.items()}
        rows = [r for name, r in done.items() if r is not None and parts[name].kind != "compare"]
        compared = [r for name, r in done.items() if r is not None and parts[name].kind == "compare"]
        if not any(r["kind"] == "baseline" for r in rows):
            raise ValueError(f"experiment {self.config.name!r}: nothing to report before the baseline is done "
                             f"(kprune experiment CONFIG --cell {self._baseline_folder(0).name})")
        return self._write_report(rows, compared)

    def _write_report(self, rows: List[dict], compared: List[dict]) -> dict:
        rows.sort(key=lambda r: ({"baseline": 0, "control": 1}.get(r["kind"], 2), r.get("seed_index", 0)))
        self.latency(rows)
        return write_report(self.out, self.config, rows, self.data, self.config.samples, compared)

    def run(self) -> dict:
        """For each seed: the baseline, every cell, then the dense controls the cells need; then
        results, plots and report; returns the results."""
        self.save_config()
        seeds = range(self.config.seeds)
        compared = [self.compared(label, k) for label in self.config.compare for k in seeds]
        rows = []
        for k in seeds:
            baseline = self.baseline(k)
            if k == 0 or not self.given:
                rows.append(baseline)
            done = [self.cell(cell, k) for cell in self.cells]
            if self.config.control:
                epochs = sorted({r["train_epochs"] for r in done if r["train_epochs"] > 0})
                rows.extend(self.control(e, k) for e in epochs)
            rows.extend(done)
        return self._write_report(rows, compared)


def _run_part(config: ExperimentConfig, name: str) -> dict:
    """One part in a Ray worker (its own process: the experiment is rebuilt from the config)."""
    return Experiment(config, progress=False).run_part(name)


def run_on_ray(config: ExperimentConfig, address: Optional[str] = None, log=print) -> dict:
    """Run an experiment's parts as Ray tasks, then write the report here, as :meth:`Experiment.run`
    would: the baselines and compared trainings first, then every cell at once, then the dense
    controls the cells need. Each task asks ``config.ray``'s CPUs and GPUs; a task whose worker died
    runs again (``retries``); progress is logged as tasks finish. The run folder must be one path that
    every Ray node sees (a shared file system); the report's timing runs here.

    Args:
        address: a running cluster's address (``ray start --head`` prints it), or None for a local
            cluster of this machine's CPUs.

    Returns:
        The results, as :meth:`Experiment.run`.

    Raises:
        ValueError: Ray is not installed (``pip install kprune[ray]``).
    """
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'kprune[ray]'") from None
    options = {"num_cpus": float(config.ray.get("cpus", 1)), "num_gpus": float(config.ray.get("gpus", 0)),
               "max_retries": int(config.ray.get("retries", 2))}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, logging_level="WARNING")
    task = ray.remote(**options)(_run_part)
    experiment = Experiment(config, progress=False, log=log)
    experiment.save_config()
    try:
        for kinds in (("baseline", "compare"), ("cell",), ("control",)):
            names = [n for n, part in experiment.parts().items()
                     if part.kind in kinds and not (part.folder / "result.json").is_file()]
            pending = {task.remote(config, name): name for name in names}
            if pending:
                log(f"[{config.name}] {len(pending)} {'/'.join(kinds)} part(s) on Ray: {', '.join(names)}")
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(finished[0])
                try:
                    result = ray.get(finished[0])
                except ray.exceptions.RayError as error:  # its traceback is in the worker's log
                    raise ValueError(f"experiment part {name} failed on Ray: {str(error).strip().splitlines()[-1]}") from None
                log(f"[{config.name}] {name}: done, mAP@0.5 {result['map50']:.4f} ({len(pending)} running)")
    finally:
        if started:
            ray.shutdown()
    return experiment.report()


class Part(NamedTuple):
    """One part of an experiment (:meth:`Experiment.parts`)."""
    name: str
    kind: str  # baseline, cell, control or compare
    what: str
    folder: Path
    run: Callable[[], dict]


def _trains_itself(cell: dict) -> bool:
    """Whether a cell's pruning trains (tfmot methods, round schedules) instead of being retrained after."""
    return get_method(cell["method"]).trains or get_schedule(cell.get("schedule", "once")).in_rounds


def control_label(epochs: int) -> str:
    """The dense control of a cell retrained ``epochs`` epochs (the baseline itself for none)."""
    return f"dense-{epochs}ep" if epochs > 0 else "baseline"


def _suffix(k: int) -> str:
    return "" if k == 0 else f".seed{k}"


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target, suffix=".keras") as tmp:
        shutil.copyfile(source, tmp)
