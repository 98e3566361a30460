"""Sensitivity analysis: the mAP a model keeps when one layer alone loses filters.

Every prunable group in scope (one conv, or convs whose channels are coupled) is pruned alone at
each ratio, its lowest-scoring filters by the criterion, and the model is evaluated without
retraining. The removed filters are silenced in the dense model instead of cut out: the outputs are
those of the physically pruned model (the surgeon's equivalence, which the tests check), and one
traced model serves every evaluation. The result is what ``--allocation independent`` ratios are
chosen from, and what ``--allocation sensitivity`` reads (:mod:`.allocation`): layers whose mAP holds
up can lose more.
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from kprune._keras import tf
from kprune.data.tfrecord import Manifest, read_manifest
from kprune.evaluate import evaluate_loaded
from kprune.prune.graph import ChannelGraph
from kprune.prune.importance import get_criterion
from kprune.prune.sample import DetectionSample
from kprune.prune.scope import layers_in_scope
from kprune.prune.plan import plan_filters, prunable_groups
from kprune.prune.surgeon import silence_channels

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def analyze(model, data, ratios: Sequence[float] = RATIOS, criterion: str = "l1", scope: str = "all",
            round_to: int = 1, split: str = "val", batch_size: int = 8, limit: Optional[int] = None,
            progress: bool = True) -> dict:
    """Evaluate ``model`` with each group pruned alone at each ratio; ``model`` is restored after.

    Args:
        data: a converted dataset folder or its manifest.
        ratios: fractions of the group's filters to remove, each in (0, 1).
        criterion, scope, round_to: as in :func:`kprune.prune.structured.prune_filters` (by
            default no rounding, so that the ratios are what they say); a data-driven criterion
            scores on the first training batches of ``data``, once per layer and ratio.
        split, batch_size, limit: the images evaluated (``limit``: the first that many).

    Returns:
        ``{"baseline": mAP@0.5, "ratios": [...], "criterion", "split", "images",
        "layers": [{"name", "producers", "channels", "kept": [...], "map50": [...]}]}``, the lists
        aligned with ``ratios``.

    Raises:
        ValueError: a ratio outside (0, 1), or nothing prunable in scope.
    """
    ratios = [float(r) for r in ratios]
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if not ratios or bad:
        raise ValueError(f"sensitivity ratios {ratios}: each must be in (0, 1)")
    manifest = data if isinstance(data, Manifest) else read_manifest(data)
    graph = ChannelGraph(model)
    groups = prunable_groups(graph, layers_in_scope(model, scope))
    if not groups:
        raise ValueError(f"scope {scope!r}: no layer with prunable filters")
    sample = DetectionSample(manifest) if get_criterion(criterion).needs_data else None
    predict = tf.function(lambda images: model(images, training=False))  # traced once, weights change in place

    def score() -> float:
        return evaluate_loaded(model, manifest, split, batch_size, predict=predict, limit=limit)["map50"]

    dense = model.get_weights()
    result = {"baseline": score(), "ratios": ratios, "criterion": criterion, "split": split,
              "images": min(manifest.num_images(split), limit or manifest.num_images(split)), "layers": []}
    with tqdm(total=len(groups) * len(ratios), desc="sensitivity", unit="eval", disable=not progress) as bar:
        try:
            for group in groups:
                row = {"name": group.name, "producers": list(group.producers),
                       "channels": len(graph.producers[group.producers[0]]), "kept": [], "map50": []}
                for ratio in ratios:
                    plan = plan_filters(model, graph, ratio, criterion, "uniform", list(group.producers), round_to,
                                        max_ratio=max(0.9, ratio), sample=sample)
                    silence_channels(model, graph, plan.removed)
                    row["kept"].append(plan.channels[group.producers[0]][1])
                    row["map50"].append(score())
                    model.set_weights(dense)
                    bar.set_postfix_str(f"{group.name} {ratio:.0%}: {row['map50'][-1]:.3f}")
                    bar.update()
                result["layers"].append(row)
        finally:
            model.set_weights(dense)
    result["most_robust"] = [row["name"] for row in sorted(result["layers"], key=lambda r: -float(np.mean(r["map50"])))]
    return result


def read_sensitivity(path: str) -> dict:
    """A ``sensitivity.json`` written by ``kprune sensitivity``.

    Raises:
        ValueError: the file is missing or is not such a result (the message names it).
    """
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"sensitivity file {path}: cannot be read ({error}); write it with kprune sensitivity") from None
    missing = [k for k in ("baseline", "ratios", "layers") if k not in result]
    if missing or not all({"producers", "map50"} <= set(row) for row in result.get("layers", [])):
        raise ValueError(f"sensitivity file {path}: not a kprune sensitivity result (missing {missing or 'layer rows'})")
    return result


def table(result: dict) -> str:
    """The mAP@0.5 of each layer at each ratio, as a fixed-width text table."""
    head = f"{'layer':<24} {'filters':>7} " + " ".join(f"{r:>6.0%}" for r in result["ratios"])
    lines = [f"baseline mAP@0.5 {result['baseline']:.4f} ({result['split']}, {result['images']} images, "
             f"criterion {result['criterion']})", head, "-" * len(head)]
    for row in result["layers"]:
        lines.append(f"{row['name']:<24} {row['channels']:>7} " + " ".join(f"{m:>6.3f}" for m in row["map50"]))
    return "\n".join(lines)


def rows(result: dict) -> List[dict]:
    """One flat record per (layer, ratio): for CSV files."""
    return [{"layer": row["name"], "filters": row["channels"], "ratio": r, "kept": k, "map50": m}
            for row in result["layers"] for r, k, m in zip(result["ratios"], row["kept"], row["map50"])]
