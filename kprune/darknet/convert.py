"""Darknet cfg + .weights <-> ``.keras`` model."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from kprune.darknet.builder import build_model
from kprune.darknet.cfg import read_cfg
from kprune.darknet.weights import load_weights, save_weights


def load_darknet(
    cfg_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    reorg_mode: str = "darknet",
    names: Optional[Sequence[str]] = None,
    bn_formula: Optional[str] = None,
):
    """Build the model of a cfg and load a .weights file into it.

    The file's header is stored in the model's heads, so :func:`export_darknet` writes it back.

    Args:
        cfg_path: Darknet cfg file.
        weights_path: the matching .weights file.
        reorg_mode: ``darknet`` (exact, for Darknet-trained weights) or ``space_to_depth``.
        names: class names to store in the heads.
        bn_formula: ``original`` or ``alexeyab`` (:data:`kprune.models.bn_formulas.BN_FORMULAS`);
            default: the formula of the Darknet the cfg was written for
            (:func:`kprune.darknet.cfg.default_bn_formula`).

    Raises:
        ValueError: an unknown batch-norm formula.
        CfgError: the cfg is invalid.
        WeightsError: the weights do not fit the cfg (names the layer).
    """
    cfg = read_cfg(cfg_path)
    model = build_model(cfg, reorg_mode=reorg_mode, names=names, bn_formula=bn_formula)
    load_weights(model, weights_path)
    return model


def export_darknet(model, weights_path: str | os.PathLike) -> None:
    """Write a model built from a Darknet cfg as a .weights file (atomically)."""
    save_weights(model, weights_path)
