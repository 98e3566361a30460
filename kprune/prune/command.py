"""``kprune prune``: prune a model by one method, optionally retrain, and report.

:func:`prune` takes a model in memory and returns the pruned one; :func:`prune_model` is the adapter
that reads a ``.keras`` file and saves the result.

Methods (the registry :data:`kprune.prune.methods.METHODS`):
    ``filters``: structured (:func:`kprune.prune.structured.prune_filters`), the filters of each
        layer chosen by an allocation strategy (:mod:`kprune.prune.allocation`), removed at once or
        in rounds with fine-tuning (the schedules of :mod:`kprune.prune.schedules`, run by
        :mod:`kprune.prune.rounds`); :func:`prune_model` writes the pruning history next to the
        model as ``OUT.history.json``.
    ``threshold``, ``percentage``, ``global``: unstructured, one shot (tfmot); retraining keeps the
        zeros.
    ``tfmot-constant``, ``tfmot-polynomial``: unstructured during retraining, on tfmot's constant or
        cubic schedule reaching the target at the start of the last epoch (needs ``data`` and
        ``epochs``).

With ``data`` and ``epochs`` the pruned model is retrained (:func:`kprune.train.train_model`, run
folder ``OUT.run/``) and the report gets the run's mAP.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional

from kprune.config import build
from kprune.evaluate import evaluate_loaded
from kprune.fileio import json_safe, write_json_atomic
from kprune.models import sparsity as S
from kprune.models.counting import count_flops, count_params
from kprune.models.io import load_model, save_model
from kprune.models.variants import variant
from kprune.prune import unstructured as U
from kprune.prune.allocation import ALLOCATIONS, get_allocation
from kprune.prune.budgets import meet_budget
from kprune.prune.latency import meet_latency_budget
from kprune.prune.methods import get_method
from kprune.prune.importance import get_criterion
from kprune.prune.reconstruct import reconstruct as fit_pruned
from kprune.prune.rounds import prune_in_rounds
from kprune.prune.sample import DetectionSample
from kprune.prune.scope import layers_in_scope
from kprune.prune.schedules import get_schedule
from kprune.prune.structured import prune_filters
from kprune.train import TrainConfig, train_model
from kprune.train.config import DENSE_TEACHER



def _measure(model) -> dict:
    params = count_params(model)
    return {"params": params["params"], "nonzero_params": params["nonzero_params"], "flops": count_flops(model)}


def _pruning_wrapper(kind: str, value: float, names, epochs: int):
    """The function that wraps a detector in tfmot's pruning for training: ``(detector, steps per
    epoch) -> wrapped``, the sparsity reaching ``value`` one epoch before the end."""
    def wrap(detector, steps):
        end = steps * max(int(epochs) - 1, 1)
        return S.wrap(detector, {n: U.make_schedule(kind, value, 0, end) for n in names})
    return wrap


def retrain(model, run_dir: str, data: str, epochs: int, train_options: Optional[dict], progress: bool,
            keep_sparsity: bool = False, prepare=None, teacher=None):
    """Train ``model`` in memory with :func:`kprune.train.train_model` in ``run_dir``; returns (model, metrics).

    ``teacher``: the dense model, for ``distill: {teacher: dense}`` in ``train_options``."""
    options = {**(train_options or {}), "dataset": data, "epochs": int(epochs), "out": str(run_dir),
               "keep_sparsity": keep_sparsity}
    return train_model(model, build(TrainConfig, options, "retraining options"), progress=progress, prepare=prepare, teacher=teacher)


def dense_teacher(model, train_options: Optional[dict]):
    """A frozen copy of ``model`` when ``train_options`` distil from the dense model, else None."""
    if ((train_options or {}).get("distill") or {}).get("teacher") != DENSE_TEACHER:
        return None
    return variant(model)


def uses_data(criterion: Optional[str], reconstruct: bool = False) -> bool:
    """Whether filter pruning with this criterion (and reconstruction) reads training images, apart
    from any retraining."""
    return (criterion is not None and get_criterion(criterion).needs_data) or reconstruct


def check_options(method: str, ratio: Optional[float] = None, threshold: Optional[float] = None,
                  allocation: Optional[str] = None, schedule: str = "once", data: Optional[str] = None,
                  epochs: Optional[int] = None, rounds: Optional[int] = None, max_drop: Optional[float] = None,
                  remove_flops: Optional[float] = None, criterion: Optional[str] = None,
                  reconstruct: bool = False, target_latency: Optional[float] = None,
                  sensitivity: Optional[dict] = None) -> str:
    """Refuse pruning options that do not fit together, before any work is done (see :func:`prune`);
    returns the allocation strategy (the schedule's default when None).

    Raises:
        ValueError: an unknown method, allocation, schedule or criterion; an allocation or schedule
            for a method that does not remove filters; a missing ratio / threshold; retraining asked
            without data or epochs; a method or schedule that trains without them; round options
            without rounds, or an allocation the rounds cannot use; a FLOPs or latency budget with a
            ratio, with the other budget, with a method that does not take one or in rounds; the
            sensitivity allocation without a budget or without curves; reconstruction other than
            after a one-shot filter pruning, or without data; a data-driven criterion without data.
    """
    kind, timing = get_method(method), get_schedule(schedule)
    if not kind.structured and (allocation is not None or schedule != "once"):
        raise ValueError(f"--allocation and --schedule choose filters (method filters), not the weights of {method}")
    allocation = allocation or timing.allocation
    allocator = get_allocation(allocation)
    if criterion is not None:
        get_criterion(criterion)
    if remove_flops is not None and target_latency is not None:
        raise ValueError("give either --remove-flops or --target-latency, not both")
    for option, budget in (("--remove-flops", remove_flops), ("--target-latency", target_latency)):
        if budget is None:
            continue
        if not kind.structured or timing.in_rounds:
            raise ValueError(f"{option}: only method filters meets a budget, pruned at once (schedule once; "
                             f"got method {method}, schedule {schedule})")
        if ratio is not None:
            raise ValueError(f"give either --ratio or {option}, not both")
        ratio = 0.0  # found by the budget search
    if allocator.budget_only:
        if remove_flops is None and target_latency is None:
            raise ValueError(f"allocation {allocation} chooses per-layer ratios to meet a budget: give "
                             "--remove-flops or --target-latency")
        if sensitivity is None:
            raise ValueError(f"allocation {allocation} needs the sensitivity curves: give --sensitivity "
                             "MODEL.sensitivity/sensitivity.json (written by kprune sensitivity)")
    value = threshold if kind.value == "threshold" else ratio
    if value is None and not (kind.structured and allocation == "independent"):
        raise ValueError(f"method {method} needs --{kind.value}")
    if reconstruct and (not kind.structured or timing.in_rounds):
        raise ValueError(f"--reconstruct re-fits the convs after a one-shot filter pruning (method filters, "
                         f"schedule once), not method {method}, schedule {schedule}")
    if reconstruct and data is None:
        raise ValueError("--reconstruct fits the pruned convs on training images: give --data")
    if uses_data(criterion) and data is None:
        raise ValueError(f"criterion {criterion} scores filters on training data: give --data")
    if (data is None) != (epochs is None) and not (uses_data(criterion, reconstruct) and epochs is None):
        raise ValueError("retraining needs both --data and --epochs")
    if kind.trains and data is None:
        raise ValueError(f"method {method} prunes while training: give --data and --epochs")
    if timing.in_rounds:
        if data is None:
            raise ValueError(f"schedule {schedule} fine-tunes after every round: give --data and --epochs")
        if not allocator.in_rounds:
            raise ValueError(f"schedule {schedule} prunes a fraction of all filters per round: allocation "
                             f"{allocation} cannot; choose one of "
                             f"{', '.join(n for n, a in ALLOCATIONS.items() if a.in_rounds)}")
    elif rounds is not None or max_drop is not None:
        raise ValueError("--rounds and --max-drop belong to the gradual and iterative schedules")
    if max_drop is not None and not timing.stops_on_drop:
        raise ValueError(f"--max-drop belongs to the iterative schedule, not {schedule}")
    return allocation


def prune(model, method: str, ratio: Optional[float] = None, threshold: Optional[float] = None,
          criterion: Optional[str] = None, allocation: Optional[str] = None, schedule: str = "once",
          scope: str = "all", include_outputs: bool = False, round_to: int = 8, max_ratio: float = 0.9,
          layer_ratios: Optional[Dict[str, float]] = None, data: Optional[str] = None, epochs: Optional[int] = None,
          train_options: Optional[dict] = None, rounds: Optional[int] = None, max_drop: Optional[float] = None,
          run_dir: Optional[str] = None, progress: bool = True, remove_flops: Optional[float] = None,
          reconstruct: bool = False, target_latency: Optional[float] = None, runtime=None,
          sensitivity: Optional[dict] = None):
    """Prune ``model`` (in memory) by one method, optionally retrain; nothing is written but the
    training runs in ``run_dir``.

    Args:
        method: one of :data:`kprune.prune.methods.METHODS` (see the module docstring).
        ratio, threshold: how much to prune (``threshold`` for the ``threshold`` method).
        criterion: filter importance (:data:`kprune.prune.importance.CRITERIA`); None: the
            schedule's (``l1-normalized`` for gradual, ``l1`` otherwise).
        allocation: for ``filters``, how the filters removed spread over the layers
            (:data:`kprune.prune.allocation.ALLOCATIONS`); None: the schedule's (``global`` for
            gradual, ``uniform`` otherwise).
        schedule: for ``filters`` (:data:`kprune.prune.schedules.SCHEDULES`): ``once``, or in
            rounds (:mod:`kprune.prune.rounds`) with ``epochs`` of fine-tuning after each, in
            ``RUN_DIR/round-K``. ``gradual``: ``rounds`` (4) rounds on the cubic schedule to
            ``ratio``. ``iterative``: ``ratio`` more of every layer's filters per round, at most
            ``rounds`` (10) rounds, stopping before the first whose mAP@0.5 drops more than
            ``max_drop`` (0.02) below that of ``model``.
        scope, include_outputs, round_to, max_ratio, layer_ratios: as in
            :func:`kprune.prune.structured.prune_filters` and :mod:`kprune.prune.scope`.
        data, epochs: retrain after pruning (in ``run_dir``); needed by the ``tfmot-*`` methods and
            the round schedules. A data-driven ``criterion`` (``taylor``) scores filters on the first
            batches of ``data`` (:mod:`kprune.prune.sample`), with or without ``epochs``.
        train_options: further :class:`kprune.train.TrainConfig` settings for retraining; with
            ``distill: {teacher: dense, weight: W}`` every retraining (and round) also learns the
            outputs of a frozen copy of ``model``.
        run_dir: the training run folder; needed whenever there is retraining.
        remove_flops: instead of ``ratio`` (method ``filters``, schedule ``once``): remove at least
            this fraction of the FLOPs, with the smallest value of the allocation's number that does
            (:meth:`kprune.prune.allocation.Allocation.searched`: the ratio; for ``independent`` the
            largest of ``layer_ratios`` scaled; for ``sensitivity`` the predicted mAP loss each layer
            may cost, its ratios read from the curves ``sensitivity``, the result of
            :func:`kprune.prune.sensitivity.analyze`); see :mod:`kprune.prune.budgets`. The report
            adds ``remove_flops`` and the ``ratio`` (the number) found.
        target_latency, runtime: instead of ``ratio`` (as ``remove_flops``): prune until ``model``
            runs in this many milliseconds at batch 1 on ``runtime`` (a
            :class:`kprune.report.runtimes.Runtime`), through per-layer latency tables
            (:func:`kprune.prune.latency.meet_latency_budget`); the report adds ``target_latency``,
            the ``ratio`` found and ``latency`` (predicted and measured, every attempt, the table).
        reconstruct: after a one-shot filter pruning, re-fit the convs that lost input channels to
            the dense model's outputs on the first training images of ``data``
            (:mod:`kprune.prune.reconstruct`); the report adds ``reconstruction`` (per layer, the
            relative output error on held-out positions before and after).

    Returns:
        ``(pruned model, report, history)``: the pruned model is a new one; the report has
        ``method``, ``params_before``, ``params_after``, ``flops_before``, ``flops_after``,
        ``nonzero_params_before``, ``nonzero_params_after``, ``layers`` (per layer: name and channels
        or sparsity before and after) and, after retraining, ``retrained`` (the run's metrics); the
        round schedules add ``rounds`` and ``stopped``, the iterative one ``baseline_map50`` and
        ``max_drop``; the history (``filters`` only, else None) maps layers to the kept filters of
        ``model`` (:func:`kprune.prune.surgeon.apply_history`).

    Raises:
        ValueError: an unknown method, a missing or meaningless ratio / threshold, retraining asked
            without data, epochs or ``run_dir``, or anything the pruning functions refuse.
    """
    allocation = check_options(method, ratio, threshold, allocation, schedule, data, epochs, rounds, max_drop,
                               remove_flops, criterion, reconstruct, target_latency, sensitivity)
    if target_latency is not None and runtime is None:
        raise ValueError("a latency budget needs the runtime to measure on")
    kind, timing = get_method(method), get_schedule(schedule)
    criterion = criterion or timing.criterion
    sample = DetectionSample(data) if kind.structured and uses_data(criterion, reconstruct) else None
    if epochs is None:
        data = None  # given only to score filters on
    if data is not None and run_dir is None:
        raise ValueError(f"method {method} retrains here: give run_dir, the folder of the training run")
    value = threshold if kind.value == "threshold" else ratio

    before = _measure(model)
    teacher = dense_teacher(model, train_options) if data is not None else None
    report = {"method": method}
    history = None
    wrap_for_training = None  # set for the tfmot methods, which prune while they train
    if kind.structured and timing.in_rounds:
        report.update(criterion=criterion, allocation=allocation, schedule=schedule)
        pruned, history = _prune_in_rounds(model, str(run_dir), report, ratio, criterion, allocation, timing, scope,
                                           round_to, max_ratio, data, epochs, train_options, rounds, max_drop,
                                           progress, sample, teacher)
        data = None  # fine-tuned already
    elif kind.structured:
        if remove_flops is None and target_latency is None:
            result = prune_filters(model, ratio or 0.0, criterion, allocation, scope, round_to, max_ratio,
                                   layer_ratios, sample=sample)
        else:
            def pruned_at(ratio, allocation=allocation, ratios=layer_ratios):
                return prune_filters(model, ratio, criterion, allocation, scope, round_to, max_ratio, ratios,
                                     sample=sample)

            attempt, high = get_allocation(allocation).searched(pruned_at, layer_ratios, sensitivity)
            if remove_flops is not None:
                found = meet_budget(model, remove_flops, attempt, high)
                report.update(remove_flops=remove_flops, ratio=found.ratio)
            else:
                found = meet_latency_budget(model, target_latency, attempt, high, runtime,
                                            progress=progress)
                report.update(target_latency=target_latency, ratio=found.ratio, latency=found.report())
            result = found.result
        pruned, history = result.model, result.history
        if reconstruct:
            report["reconstruction"] = fit_pruned(model, pruned, history,
                                                  lambda: (images for images, _ in sample.batches(model)))
        report["layers"] = result.layers
        report.update(criterion=criterion, allocation=allocation, schedule=schedule, protected=result.protected,
                      unhandled=result.unhandled, capped=result.capped)
    else:
        names = layers_in_scope(model, scope, outputs=include_outputs)
        before_sparsity = S.sparsity(model, names)
        if kind.trains:
            wrap_for_training = _pruning_wrapper(method[len("tfmot-"):], value, names, epochs)
            pruned = model
        else:
            targets = U.layer_sparsities(model, method, value, names)
            wrapped = S.wrap(model, {n: U.make_schedule("constant", s) for n, s in targets.items()})
            U.prune_now(wrapped)
            # tfmot's strip reuses the wrapped model's layer objects, so a head layer's ``output`` is
            # still the wrapped model's tensor and the detector is not recognised; a copy with its
            # own layers (as a saved and reloaded model has) is
            pruned = variant(S.strip(wrapped))
        report["layers"] = [{"name": n, "sparsity_before": before_sparsity[n]} for n in names]

    if data is not None:
        pruned, report["retrained"] = retrain(pruned, str(run_dir), data, epochs, train_options, progress,
                                               teacher=teacher,
                                               keep_sparsity=kind.keeps_sparsity,
                                               prepare=wrap_for_training)

    after = _measure(pruned)
    if not kind.structured:
        after_sparsity = S.sparsity(pruned, [row["name"] for row in report["layers"]])
        for row in report["layers"]:
            row["sparsity_after"] = after_sparsity[row["name"]]
    report.update(params_before=before["params"], params_after=after["params"], flops_before=before["flops"],
                  flops_after=after["flops"], nonzero_params_before=before["nonzero_params"],
                  nonzero_params_after=after["nonzero_params"])
    return pruned, report, history


def prune_model(model_path: str, out: str, method: str, ratio: Optional[float] = None,
                threshold: Optional[float] = None, criterion: Optional[str] = None, allocation: Optional[str] = None,
                schedule: str = "once",
                scope: str = "all", include_outputs: bool = False, round_to: int = 8, max_ratio: float = 0.9,
                layer_ratios: Optional[Dict[str, float]] = None, data: Optional[str] = None,
                epochs: Optional[int] = None, train_options: Optional[dict] = None, rounds: Optional[int] = None,
                max_drop: Optional[float] = None, progress: bool = True, remove_flops: Optional[float] = None,
                reconstruct: bool = False, target_latency: Optional[float] = None, runtime=None,
                sensitivity: Optional[dict] = None) -> dict:
    """Load ``model_path``, :func:`prune` it, and save the result as ``out`` (a ``.keras`` file);
    returns the report.

    Retraining runs in ``OUT.run/`` (the round schedules' in ``OUT.run/round-K``); a ``filters``
    history is written as ``OUT.history.json``. Arguments as in :func:`prune`.

    Returns:
        :func:`prune`'s report with ``model`` (the path) second, ``out`` and, with a history file,
        ``history`` (its path) last.

    Raises:
        ValueError: as :func:`prune` (checked before the model is loaded), ``out`` not ending in
            ``.keras``, or a model that cannot be read.
    """
    check_options(method, ratio, threshold, allocation, schedule, data, epochs, rounds, max_drop, remove_flops,
                  criterion, reconstruct, target_latency, sensitivity)
    if not str(out).endswith(".keras"):
        raise ValueError(f"--out {out}: must end in .keras")
    stem = str(out)[: -len(".keras")]
    pruned, pruned_report, history = prune(
        load_model(model_path), method, ratio=ratio, threshold=threshold, criterion=criterion, allocation=allocation,
        schedule=schedule,
        scope=scope, include_outputs=include_outputs, round_to=round_to, max_ratio=max_ratio,
        layer_ratios=layer_ratios, data=data, epochs=epochs, train_options=train_options, rounds=rounds,
        max_drop=max_drop, run_dir=stem + ".run", progress=progress, remove_flops=remove_flops,
        reconstruct=reconstruct, target_latency=target_latency, runtime=runtime, sensitivity=sensitivity)
    report = {"method": method, "model": str(model_path), **pruned_report, "out": str(out)}
    save_model(pruned, out)
    if history is not None:
        write_json_atomic(stem + ".history.json", history)
        report["history"] = stem + ".history.json"
    return report


def _prune_in_rounds(model, run_dir, report, ratio, criterion, allocation, timing, scope, round_to, max_ratio,
                     data, epochs, train_options, rounds, max_drop, progress, sample, teacher):
    """The gradual and iterative schedules; fills ``report`` and returns (model, history)."""
    targets, baseline = timing.targets(ratio, rounds), None
    if timing.stops_on_drop:
        max_drop = 0.02 if max_drop is None else max_drop
        baseline = evaluate_loaded(model, data)["map50"]
        report.update(baseline_map50=baseline, max_drop=max_drop)

    def finetune(pruned, t):
        return retrain(pruned, os.path.join(run_dir, f"round-{t}"), data, epochs, train_options, progress,
                       teacher=teacher)

    log = (lambda line: print(line, file=sys.stderr)) if progress else None
    result = prune_in_rounds(model, targets, finetune, criterion, allocation, scope, round_to, max_ratio,
                             baseline_map=baseline, max_drop=max_drop, log=log, sample=sample)
    report.update(rounds=result.rounds, stopped=result.stopped, layers=result.layers)
    if result.metrics:
        report["retrained"] = result.metrics
    return result.model, result.history


def summary(report: dict) -> str:
    """A few readable lines for the terminal."""
    lines = [
        f"{report['method']}: parameters {report['params_before']:,} -> {report['params_after']:,}, "
        f"non-zero {report['nonzero_params_before']:,} -> {report['nonzero_params_after']:,}, "
        f"FLOPs {report['flops_before'] / 1e9:.3f} -> {report['flops_after'] / 1e9:.3f} G",
    ]
    for row in report.get("reconstruction", []):
        lines.append(f"  reconstructed {row['name']:<12} output error {row['error_before']:.4f} -> {row['error_after']:.4f} "
                     f"({row['rows']} positions)")
    if report.get("remove_flops") is not None:
        lines.append(f"FLOPs budget: {report['remove_flops']:.1%} asked, "
                     f"{1 - report['flops_after'] / report['flops_before']:.1%} removed (ratio {report['ratio']:.4f})")
    if report.get("latency") is not None:
        lat, table = report["latency"], report["latency"]["table"]
        lines.append(f"latency budget ({table['runtime']}): {lat['target_ms']:.2f} ms asked, dense {lat['dense_ms']:.2f} "
                     f"ms; pruned: predicted {lat['predicted_ms']:.2f} ms, measured {lat['measured_ms']:.2f} ms "
                     f"({lat['within']:.1%} off the target, {len(lat['attempts'])} search(es)); latency table: "
                     f"{table['measured']} entries measured, {table['cached']} from the cache, {table['seconds']:.0f} s")
    for row in report["layers"]:
        if "channels_before" in row:
            if row["channels_before"] != row["channels_after"]:
                lines.append(f"  {row['name']:<24} {row['channels_before']:>6} -> {row['channels_after']:<6} filters")
        else:
            lines.append(f"  {row['name']:<24} sparsity {row['sparsity_before']:.3f} -> {row['sparsity_after']:.3f}")
    for r in report.get("rounds", []):
        lines.append(f"round {r['round']}: {r['removed']:.1%} of the filters removed (target {r['target']:.1%}), "
                     f"FLOPs {r['flops'] / 1e9:.3f} G, mAP@0.5 {r['map50']:.4f}")
    if report.get("stopped"):
        lines.append(report["stopped"])
    if "retrained" in report:
        lines.append(f"retrained: mAP@0.5 {report['retrained']['map50']:.4f}")
    lines.append(f"saved {report['out']}" + (f" and {report['history']}" if "history" in report else ""))
    return "\n".join(lines)


def dumps(report: dict) -> str:
    """The report as JSON (non-finite numbers as null)."""
    return json.dumps(json_safe(report), indent=1, allow_nan=False)
