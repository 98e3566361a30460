"""Plots as PNG files (matplotlib, no display needed); every file is written atomically."""

from __future__ import annotations

import os


def _figure(width: float = 7.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(width, height), constrained_layout=True)


def _save(plt, fig, path: str | os.PathLike) -> str:
    from kprune.fileio import atomic_path

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
