"""The results of an experiment sweep: ``results.json``, ``results.csv``, plots and ``report.md``.

Every figure in the report comes from the cells' ``result.json`` files; nothing is re-measured here
except the sample detections drawn for the plots. ``results.csv`` has one line per trained model
(every seed); the report's tables have one line per model of the sweep, the mean over its seeds,
with the change against its dense control and against the baseline judged by
:mod:`kprune.report.stats`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import numpy as np
import yaml

from kprune.detectors.inference import detect
from kprune.export.tflite import calibration_images
from kprune.fileio import write_bytes_atomic, write_csv_atomic, write_json_atomic
from kprune.models.inference import draw_detections
from kprune.models.io import load_model
from kprune.report import plots
from kprune.report.stats import ALPHA, Difference, difference, summarize

PLOTS = {
    "map_vs_params": "map_vs_params.png",
    "map_vs_flops": "map_vs_flops.png",
    "latency_vs_flops": "latency_vs_flops.png",
    "kept_filters": "kept_filters.png",
    "samples": "samples.png",
}


def flat_rows(rows: List[dict]) -> List[dict]:
    """One flat record per trained model (the first seed's baseline first), the columns of
    ``results.csv``."""
    base = rows[0]
    # each run's change is against the baseline of its own seed (one baseline when it was given)
    baselines = {r.get("seed_index", 0): r for r in rows if r["label"] == "baseline"}
    out = []
    for r in rows:
        m = r["measure"]
        own = baselines.get(r.get("seed_index", 0), base)
        row = {
            "label": r["label"], "family": r["family"], "kind": r.get("kind", "cell"),
            "seed": r.get("seed"), "seed_index": r.get("seed_index", 0), "control": r.get("control"),
            "train_epochs": r.get("train_epochs"), "ratio": r["ratio"],
            "params": m["params"], "nonzero_params": m["nonzero_params"], "flops": m["flops"],
            "flops_removed": 1.0 - m["flops"] / base["measure"]["flops"],
            "nonzero_removed": 1.0 - m["nonzero_params"] / base["measure"]["nonzero_params"],
            "map50_pruned": r.get("map50_pruned"), "map50": r["map50"], "coco_map": r["coco_map"],
            "map50_change": r["map50"] - own["map50"],
            # what the model cost on top of the baseline: pruning (reconstruction included) and retraining
            "minutes": (None if r.get("kind", "cell") == "baseline"
                        else ((r.get("prune_seconds") or 0.0) + (r.get("train_seconds") or 0.0)) / 60),
            "keras_mb": m["keras_size"]["bytes"] / 1e6, "keras_gzip_mb": m["keras_size"]["gzip"] / 1e6,
            "keras_bzip2_mb": m["keras_size"]["bzip2"] / 1e6, "keras_xz_mb": m["keras_size"]["xz"] / 1e6,
            "tflite_mb": m["tflite_size"]["bytes"] / 1e6,
        }
        for key, value in m["latency"].items():
            row[f"{key}_ms"] = value["median_ms"]
        for quant, entry in r["export"].items():
            row[f"{quant}_tflite_mb"] = entry["bytes"] / 1e6
            row[f"{quant}_map50"] = entry["map50"]
        row["speedup_tflite_2t"] = base["measure"]["latency"]["tflite_2t"]["median_ms"] / row["tflite_2t_ms"]
        if row.get("tflite_int8_2t_ms"):
            # the same model's float file against its int8 file, timed in the same interleaved runs
            row["speedup_int8_2t"] = row["tflite_2t_ms"] / row["tflite_int8_2t_ms"]
        out.append(row)
    return out


def summary_rows(flat: List[dict], spread: Optional[float] = None) -> List[dict]:
    """One record per model of the sweep (baseline, dense controls, cells; in that order): the
    numbers averaged over its seeds, ``n`` (runs), ``map50_std`` (None for one run), and
    ``vs_baseline`` / ``vs_control`` (:class:`kprune.report.stats.Difference` as dicts; None where
    there is nothing to compare). ``map50_change`` is the change of the mean against the baseline's.

    Args:
        flat: :func:`flat_rows`.
        spread: the standard deviation of one run, for groups of a single run.
    """
    groups = {}
    for row in flat:
        groups.setdefault(row["label"], []).append(row)
    maps = {label: [r["map50"] for r in members] for label, members in groups.items()}
    out = []
    for label, members in groups.items():
        row = dict(members[0])
        for key, value in members[0].items():
            if key not in ("seed", "seed_index", "ratio") and isinstance(value, float):
                values = [m[key] for m in members if m.get(key) is not None]
                row[key] = sum(values) / len(values) if len(values) == len(members) else value
        stats_ = summarize(maps[label])
        row.update(n=stats_.n, map50_std=stats_.std, map50_text=stats_.text(),
                   map50_change=stats_.mean - summarize(maps["baseline"]).mean)
        row["vs_baseline"] = None if label == "baseline" else difference(maps[label], maps["baseline"], spread).as_dict()
        control = row.get("control")
        row["vs_control"] = (difference(maps[label], maps[control], spread).as_dict()
                             if row["kind"] == "cell" and control in maps else None)
        for key in ("seed", "seed_index"):
            row.pop(key, None)
        out.append(row)
    return out


def _difference_text(d: Optional[dict]) -> str:
    return "–" if d is None else Difference(**d).text()


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def headline_table(flat: List[dict]) -> str:
    """The table users compare: size, FLOPs, accuracy before / after retraining, int8, latency
    (float TFLite at 2 threads and its speed-up over the baseline; with int8 files, the int8 file
    at 2 threads and its speed-up over the same model's float file)."""
    int8 = any(r.get("tflite_int8_2t_ms") for r in flat)
    head = ["model", "runs", "params", "non-zero", "GFLOPs", "FLOPs removed", "mAP@0.5 pruned",
            "mAP@0.5 retrained", "vs dense control", "vs baseline", "minutes", "int8 mAP@0.5", "TFLite 2t ms",
            "speed-up", *(["int8 2t ms", "int8 vs float"] if int8 else []), "int8 MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in flat:
        int8_cells = []
        if int8:
            int8_cells = ([f"{r['tflite_int8_2t_ms']:.1f}", f"{r['speedup_int8_2t']:.2f}x"]
                          if r.get("tflite_int8_2t_ms") else ["–", "–"])
        lines.append("| " + " | ".join([
            r["label"], str(r.get("n", 1)), _fmt(r["params"]), _fmt(r["nonzero_params"]), f"{r['flops'] / 1e9:.3f}",
            f"{100 * r['flops_removed']:.1f} %", _fmt(r["map50_pruned"]), r.get("map50_text") or _fmt(r["map50"]),
            _difference_text(r.get("vs_control")), _difference_text(r.get("vs_baseline")), _fmt(r.get("minutes"), 1),
            _fmt(r.get("int8_map50")),
            f"{r['tflite_2t_ms']:.1f}", f"{r['speedup_tflite_2t']:.2f}x", *int8_cells,
            _fmt(r.get("int8_tflite_mb"), 2)]) + " |")
    return "\n".join(lines)


def findings(flat: List[dict]) -> List[str]:
    """Plain statements about the sweep (``flat``: :func:`summary_rows`): the best model with at
    least half the FLOPs removed against its dense control, the int8 cost, and the measured speed-up."""
    base = flat[0]
    cells = [r for r in flat if r.get("kind", "cell") == "cell"]
    lines = []
    halved = [r for r in cells if r["flops_removed"] >= 0.5]
    if halved:
        best = max(halved, key=lambda r: r["map50"])
        against = best["vs_control"] or best["vs_baseline"]
        control = best["control"] if best["vs_control"] else "baseline"
        lines.append(f"Best model with at least 50 % of the FLOPs removed: **{best['label']}**, "
                     f"{100 * best['flops_removed']:.1f} % removed, mAP@0.5 {best['map50_text']} against "
                     f"{control}: {_difference_text(against)} "
                     f"(the goal is within 2 points: {'met' if against['change'] >= -0.02 else 'not met'}). "
                     f"TFLite at 2 threads: {best['tflite_2t_ms']:.1f} ms against {base['tflite_2t_ms']:.1f} ms "
                     f"({best['speedup_tflite_2t']:.2f}x).")
    elif cells:
        most = max(cells, key=lambda r: r["flops_removed"])
        lines.append(f"No cell removed 50 % of the FLOPs; the most was {most['label']}: "
                     f"{100 * most['flops_removed']:.1f} %, mAP@0.5 {most['map50']:.4f} "
                     f"({100 * most['map50_change']:+.1f} points against the baseline).")
    if base.get("tflite_int8_2t_ms"):
        timed = [r for r in flat if r.get("tflite_int8_2t_ms") and r.get("kind", "cell") != "control"]
        slowest = min(timed, key=lambda r: r["speedup_int8_2t"])
        lines.append(f"int8 TFLite at 2 threads (timed in the same runs as float): the baseline "
                     f"{base['tflite_int8_2t_ms']:.1f} ms against {base['tflite_2t_ms']:.1f} ms float "
                     f"({base['speedup_int8_2t']:.2f}x); the smallest int8 gain is {slowest['speedup_int8_2t']:.2f}x "
                     f"({slowest['label']}).")
    if "int8_map50" in base:
        worst = min(flat, key=lambda r: r["int8_map50"] - r["none_map50"])
        lines.append(f"int8 against float TFLite: the baseline changes by "
                     f"{100 * (base['int8_map50'] - base['none_map50']):+.1f} points of mAP@0.5; the largest change "
                     f"is {100 * (worst['int8_map50'] - worst['none_map50']):+.1f} points ({worst['label']}; the goal "
                     f"is within 1 point: {'met' if worst['int8_map50'] - worst['none_map50'] >= -0.01 else 'not met'}).")
    return lines


def spread_note(flat: List[dict], seeds: int, spread: Optional[float]) -> str:
    """How the report decides that a change is real (see :mod:`kprune.report.stats`)."""
    base = flat[0]
    runs = (f"Every training ran {seeds} times, with consecutive seeds; mAP@0.5 is the mean ± the sample "
            f"standard deviation over the runs (the baseline: {base['map50_text']})."
            if seeds > 1 else "Every training ran once (`seeds: 1`).")
    if seeds > 1:
        rule = (f"A change is called better or worse when Welch's two-sided t-test rejects equal means at "
                f"{ALPHA:g}; otherwise it is within the spread.")
    elif spread is not None:
        rule = (f"With one run each, the run-to-run standard deviation given in the config ({spread:.3f} mAP@0.5, "
                f"measured over seeds elsewhere) decides: a change is called better or worse when a two-sided "
                f"z-test with it rejects equal means at {ALPHA:g} (for two single runs: a change larger than "
                f"{100 * 1.96 * spread * 2 ** 0.5:.1f} points); otherwise it is within the spread.")
    else:
        rule = "With one run and no `spread:` in the config, no change is called better or worse."
    return (f"{runs} {rule} Each pruned model is compared with its *dense control*, the baseline retrained "
            "for as many epochs with the same settings (a model not retrained: with the baseline itself), "
            "and with the baseline as trained.")


def sample_detections(rows: List[dict], data, count: int, path) -> Optional[str]:
    """Detections of the baseline and of the structured cell with the most FLOPs removed on the
    first ``count`` validation images, side by side."""
    if count < 1:
        return None
    base = rows[0]
    candidates = [r for r in rows[1:] if r.get("method") == "filters"] or rows[1:]
    after = min(candidates, key=lambda r: r["measure"]["flops"]) if candidates else None
    chosen = [base] + ([after] if after else [])
    models = [load_model(r["model"]) for r in chosen]
    size = models[0].input_shape[1]
    images = (calibration_images(data, count, "val", size) * 255).round().astype(np.uint8)
    drawn, titles = [], []
    for image in images:
        for row, model in zip(chosen, models):
            (dets,) = detect(model, [image], score_threshold=0.3)
            drawn.append(draw_detections(image, dets))
            titles.append(f"{row['label']}: {len(dets)} detections")
    return plots.image_grid(drawn, titles, len(chosen), path)


def compared_table(compared: List[dict]) -> str:
    """The ``compare`` trainings (e.g. the retraining modes): mode, epochs, time and accuracy."""
    lines = ["| training | mode | runs | epochs | minutes | mAP@0.5 | mAP@0.5 11-point | COCO mAP |",
             "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in compared:
        groups.setdefault(r["label"], []).append(r)
    for label, runs in groups.items():
        r = runs[0]
        seconds = [x["train_seconds"] for x in runs if x.get("train_seconds") is not None]
        minutes = sum(seconds) / len(seconds) / 60 if seconds else None
        mean = {key: summarize([x[key] for x in runs]) if all(x.get(key) is not None for x in runs) else None
                for key in ("map50", "map50_11pt", "coco_map")}
        lines.append(f"| {label} | {r['mode']} | {len(runs)} | {_fmt(r.get('epochs'))} | {_fmt(minutes, 1)} | "
                     + " | ".join("–" if m is None else m.text(4) for m in mean.values()) + " |")
    return "\n".join(lines)


def write_report(out: Path, config, rows: List[dict], data, samples: int, compared: Optional[List[dict]] = None) -> dict:
    """Write results.json, results.csv, the plots and report.md into ``out``; returns the results.

    ``compared``: results of the trainings run beside the baseline (``compare`` in the config).
    """
    out = Path(out)
    per_run = flat_rows(rows)
    flat = summary_rows(per_run, config.spread)
    results = {"name": config.name, "rows": rows, "flat": flat, "runs": per_run, "compare": compared or []}
    write_json_atomic(out / "results.json", results)
    write_csv_atomic(out / "results.csv", per_run)
    plots.accuracy_plot(flat, "params", "parameters (millions)", out / PLOTS["map_vs_params"], scale=1e6)
    plots.accuracy_plot(flat, "flops", "GFLOPs per image", out / PLOTS["map_vs_flops"], scale=1e9)
    plots.latency_plot([r for r in flat if r["kind"] != "control"], out / PLOTS["latency_vs_flops"])
    first = [r for r in rows if r.get("seed_index", 0) == 0 and r.get("kind") != "control"]
    plots.kept_filters_plot(first, out / PLOTS["kept_filters"])
    sample_path = sample_detections(first, data, samples, out / PLOTS["samples"])

    base = flat[0]
    quant_lines = ["| model | " + " | ".join(f"{q} MB | {q} mAP@0.5" for q in rows[0]["export"]) + " |",
                   "|---|" + "---|---|" * len(rows[0]["export"])]
    for r in flat:
        quant_lines.append(f"| {r['label']} | " + " | ".join(
            f"{r[f'{q}_tflite_mb']:.2f} | {r[f'{q}_map50']:.4f}" for q in rows[0]["export"]) + " |")
    latency_keys = [k for k in base if k.endswith("t_ms")]
    latency_lines = ["| model | GFLOPs | " + " | ".join(k[:-3].replace("_", " ") + " ms" for k in latency_keys) + " |",
                     "|---|---|" + "---|" * len(latency_keys)]
    for r in (r for r in flat if r["kind"] != "control"):  # a control times as the baseline
        latency_lines.append(f"| {r['label']} | {r['flops'] / 1e9:.3f} | "
                             + " | ".join(f"{r[k]:.1f}" for k in latency_keys) + " |")
    size_lines = ["| model | non-zero removed | .keras MB | gzip MB | bzip2 MB | xz MB | TFLite MB |",
                  "|---|---|---|---|---|---|---|"]
    for r in flat:
        size_lines.append(f"| {r['label']} | {100 * r['nonzero_removed']:.1f} % | {r['keras_mb']:.2f} | "
                          f"{r['keras_gzip_mb']:.2f} | {r['keras_bzip2_mb']:.2f} | {r['keras_xz_mb']:.2f} | "
                          f"{r['tflite_mb']:.2f} |")
    text = [
        f"# {config.name}", "",
        f"Dataset `{data}`; {sum(r['kind'] == 'cell' for r in flat)} pruned models against the baseline and "
        f"{sum(r['kind'] == 'control' for r in flat)} dense controls; mAP@0.5 is VOC all-point at IoU "
        f"0.5 on the validation split, latency is batch 1, median of {config.latency_runs} runs after warm-up, the models "
        f"timed side by side (runs interleaved).", "",
        "## Results", "", headline_table(flat), "",
        spread_note(flat, config.seeds, config.spread), "",
        "## Findings", "", *[f"- {line}" for line in findings(flat)], "",
        *(["## Retraining compared", "", compared_table(compared), ""] if compared else []),
        "## Accuracy against size", "", f"![mAP against parameters]({PLOTS['map_vs_params']})",
        f"![mAP against FLOPs]({PLOTS['map_vs_flops']})", "",
        "## Kept filters per layer", "", f"![kept filters]({PLOTS['kept_filters']})", "",
        "## Quantization (TFLite)", "", *quant_lines, "",
        "## Latency", "", *latency_lines, "", f"![latency against FLOPs]({PLOTS['latency_vs_flops']})", "",
        "## Sizes", "", *size_lines, "",
    ]
    if sample_path:
        text += ["## Sample detections", "", f"![sample detections]({PLOTS['samples']})", ""]
    text += ["## Configuration", "", "```yaml", yaml.safe_dump(_config_dict(config), sort_keys=False).strip(),
             "```", ""]
    write_bytes_atomic(out / "report.md", "\n".join(text).encode("utf-8"))
    return results


def _config_dict(config) -> dict:
    return dataclasses.asdict(config)
