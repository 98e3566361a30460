"""Darknet cfg + .weights <-> ``.keras`` model."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from kprune.darknet.builder import build_model
from kprune.darknet.cfg import read_cfg
from kprune.darknet.weights import load_weights, weights_bytes
from kprune.darknet.writer import cfg_path_for, model_cfg
from kprune.fileio import write_bytes_atomic


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


def export_darknet(model, weights_path: str | os.PathLike) -> str:
    """Write a model built from a Darknet cfg as a Darknet cfg + .weights pair, each atomically.

    The cfg goes beside the weights with the same stem (``out.weights`` -> ``out.cfg``) and is
    generated from the model (:func:`kprune.darknet.writer.model_cfg`), so a pruned or width-scaled
    model's pair loads in Darknet as it is.

    Args:
        model: a model built from a Darknet cfg (possibly pruned, width-scaled or resized since).
        weights_path: the .weights file to write.

    Returns:
        The path of the cfg file written.

    Raises:
        ValueError: the model was not built from a Darknet cfg or has a layer a cfg cannot express
            (the message names the layer); then neither file is written.
    """
    text = model_cfg(model)  # first: a model without a cfg gets no .weights either
    data = weights_bytes(model)
    cfg_path = cfg_path_for(weights_path)
    write_bytes_atomic(weights_path, data)
    write_bytes_atomic(cfg_path, text.encode("utf-8"))
    return cfg_path
