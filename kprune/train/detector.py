"""The detector a training config asks for, made ready to train: built or loaded, fitted to the
dataset's classes, anchors set, trainable layers chosen."""

from __future__ import annotations

from typing import List, Optional, Sequence

from kprune import detectors
from kprune._keras import keras
from kprune.darknet.builder import build_model
from kprune.darknet.weights import load_weights
from kprune.models.head import class_mapping
from kprune.models.inference import read_names
from kprune.models.io import load_model
from kprune.train.config import TrainConfig


def build_detector(config: TrainConfig, classes: Sequence[str], model=None):
    """The detector a config asks for, fitted to the dataset's ``classes`` (see :class:`TrainConfig`);
    ``model``, a detector in memory, replaces the config's ``model`` / ``init`` / ``cfg``.

    Returns:
        (model, label_map): label_map maps dataset labels to model labels (None when identical).

    Raises:
        ValueError: the model's classes do not fit the dataset in mode ``full``.
    """
    size = config.input_size
    if model is not None:
        if size and model.input_shape[1] != size:
            raise ValueError(f"the given model takes {model.input_shape[1]} px inputs, not input_size {size}")
    elif config.model:
        keep = config.mode == "head"
        model = detectors.build(config.model, input_size=size, width=config.width,
                                classes=None if keep else len(classes), names=None if keep else list(classes))
    elif config.init:
        model = load_model(config.init)
        if size and model.input_shape[1] != size:
            raise ValueError(f"{config.init} takes {model.input_shape[1]} px inputs; input_size {size} "
                             "needs the model rebuilt from its cfg")
    else:
        names = read_names(config.names) if config.names else None
        model = build_model(config.cfg, names=names, bn_formula=config.bn_formula,
                            **({"input_size": size} if size else {}))
        load_weights(model, config.weights)
    family = detectors.family_of(model)
    count = family.num_classes(model)
    if config.mode == "new-head":
        model = family.replace_classes(model, len(classes), classes)
    elif config.mode == "head" or config.class_map:  # the model's classes kept, the dataset's mapped onto them
        return model, class_mapping(classes, family.class_names(model), config.class_map)
    elif count != len(classes):
        raise ValueError(f"the model has {count} classes and the dataset {len(classes)} "
                         f"({', '.join(classes)}): use --mode new-head (new last conv), --mode head, or a "
                         "class_map to keep the model's classes")
    return model, None


def set_anchors(model, config: TrainConfig, manifest) -> Optional[dict]:
    """Give the model's heads the anchors of ``config.anchors`` (nothing when it is None).

    Returns:
        None, or ``{"anchors": per head, "mean_iou": ..., "mean_iou_before": ...}`` (the mean best
        IoU of the training boxes with the new and the old anchors; None for given anchors).

    Raises:
        ValueError: given anchors whose count differs from the head's.
    """
    if config.anchors is None:
        return None
    family = detectors.family_of(model)
    if not hasattr(family, "fit_anchors"):
        raise ValueError(f"anchors = {config.anchors!r}: a model of the {family.name} family has no anchors to set "
                         "(its default boxes are part of its architecture)")
    if config.anchors == "kmeans":
        return family.fit_anchors(model, manifest, letterbox=config.letterbox, seed=config.seed)
    return family.set_anchors(model, config.anchors)


def set_trainable(model, mode: str) -> None:
    """``head`` mode: only the predictor convs train; otherwise everything."""
    convs = set(detectors.family_of(model).predictor_convs(model))
    for layer in model.layers:
        layer.trainable = mode != "head" or layer.name in convs


def variable_input_view(model):
    """The same layers (the same weights) on an input of any size, for multi-scale training."""
    return keras.models.clone_model(model, input_tensors=keras.Input((None, None, model.input_shape[-1])),
                                    clone_function=lambda layer: layer)


def class_names(model) -> List[str]:
    """The class names stored in a model's head (or their indices as text)."""
    family = detectors.family_of(model)
    return family.class_names(model) or [str(i) for i in range(family.num_classes(model))]
