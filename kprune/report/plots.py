"""Plots as PNG files (matplotlib, no display needed); every file is written atomically."""

from __future__ import annotations

import os

from kprune.fileio import atomic_path


def _figure(width: float = 7.0, height: float = 4.5, rows: int = 1, columns: int = 1):
    # matplotlib is imported here, not with the module: choosing the Agg backend at import would
    # change the backend of whoever imports kprune (a notebook, say)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=(width, height), constrained_layout=True, squeeze=False)
    return plt, (fig, axes if rows * columns > 1 else axes[0, 0])


def _save(plt, fig, path: str | os.PathLike) -> str:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return os.fspath(path)


def sensitivity_plot(result: dict, path: str | os.PathLike) -> str:
    """mAP@0.5 against the fraction of filters removed, one line per layer (the result of
    :func:`kprune.prune.sensitivity.analyze`), with the unpruned baseline dashed."""
    plt, (fig, ax) = _figure(8.0, 5.0)
    colors = plt.get_cmap("viridis")
    n = max(len(result["layers"]) - 1, 1)
    for k, row in enumerate(result["layers"]):
        ax.plot([100 * r for r in result["ratios"]], row["map50"], marker="o", markersize=3, linewidth=1,
                color=colors(k / n), label=row["name"])
    ax.axhline(result["baseline"], color="black", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("filters removed from the layer alone (%)")
    ax.set_ylabel("mAP@0.5 (no retraining)")
    ax.set_title(f"Sensitivity of each layer ({result['criterion']})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(result["layers"]) > 12 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, path)


def _by_family(rows):
    families = {}
    for row in rows:
        if row["label"] != "baseline":
            families.setdefault(row["family"], []).append(row)
    return families


def accuracy_plot(rows, x_key: str, x_label: str, path, scale: float = 1.0) -> str:
    """mAP@0.5 after retraining against ``x_key`` (e.g. parameters or FLOPs), one line per method,
    the baseline as a star."""
    plt, (fig, ax) = _figure()
    for family, members in _by_family(rows).items():
        members = sorted(members, key=lambda r: r[x_key])
        ax.plot([r[x_key] / scale for r in members], [r["map50"] for r in members], marker="o", label=family)
    base = next(r for r in rows if r["label"] == "baseline")
    ax.plot([base[x_key] / scale], [base["map50"]], marker="*", markersize=14, color="black", linestyle="",
            label="baseline")
    ax.set_xlabel(x_label)
    ax.set_ylabel("mAP@0.5 (VOC all-point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def latency_plot(rows, path) -> str:
    """TFLite latency (2 threads, median) against GFLOPs: does removing FLOPs remove time?"""
    plt, (fig, ax) = _figure()
    for family, members in [("baseline", [r for r in rows if r["label"] == "baseline"])] + list(_by_family(rows).items()):
        ax.plot([r["flops"] / 1e9 for r in members], [r["tflite_2t_ms"] for r in members],
                marker="*" if family == "baseline" else "o", linestyle="", markersize=10 if family == "baseline" else 6,
                label=family)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("TFLite latency, 2 threads, median (ms)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def kept_filters_plot(rows, path) -> str:
    """Fraction of each layer's filters kept, one line per structured cell."""
    plt, (fig, ax) = _figure(9.0, 4.5)
    names = None
    for row in rows:
        layers = [layer for layer in row.get("layers") or [] if "channels_before" in layer]
        if not layers:
            continue
        names = names or [layer["name"] for layer in layers]
        kept = {layer["name"]: layer["channels_after"] / layer["channels_before"] for layer in layers}
        ax.plot(range(len(names)), [kept.get(n, 1.0) for n in names], marker="o", markersize=3, label=row["label"])
    if names:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.legend(fontsize=7)
    ax.set_ylabel("filters kept (fraction)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def image_grid(images, titles, columns: int, path) -> str:
    """Images (RGB uint8) in a grid with a title each."""
    rows = (len(images) + columns - 1) // columns
    plt, (fig, axes) = _figure(3.2 * columns, 3.4 * rows, rows, columns)
    axes = list(getattr(axes, "flat", [axes]))
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    for ax in axes:
        ax.axis("off")
    return _save(plt, fig, path)
