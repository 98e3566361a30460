"""Detector families and their registry.

``FAMILIES`` holds one object per family (:class:`~kprune.detectors.base.DetectorFamily`); a model's
family is found from the head layers among its outputs (:func:`family_of`), a zoo name's from the
family that lists it (:func:`build`). Command-line choices and config validation come from here.

Adding a family: a package ``kprune/detectors/NAME/`` with its builders, target encoder, loss and
decoder, a head layer in :mod:`kprune.models.layers` that carries its metadata, a handler for that
layer in :mod:`kprune.prune.graph`, and one line in ``FAMILIES`` below.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from kprune.detectors.base import DetectorFamily
from kprune.detectors.rcnn import RCNNFamily
from kprune.detectors.ssd import SSDFamily
from kprune.detectors.yolo import YoloFamily

FAMILIES: Dict[str, DetectorFamily] = {family.name: family for family in (YoloFamily(), SSDFamily(), RCNNFamily())}


def get(name: str) -> DetectorFamily:
    """The family registered as ``name``.

    Raises:
        ValueError: no such family (the message lists the families).
    """
    if name not in FAMILIES:
        raise ValueError(f"detector family {name!r} does not exist; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model) -> DetectorFamily:
    """The family of a model built by kprune, from its head layers.

    Raises:
        ValueError: the model has no head layer of any family (an arbitrary Keras model).
    """
    for family in FAMILIES.values():
        if family.owns(model):
            return family
    raise ValueError(f"model {model.name!r} carries no detector-family metadata (no head layer of "
                     f"{', '.join(FAMILIES)}): kprune cannot decode, train or export it as a detector. Build it "
                     "with `kprune init NAME` or from a Darknet cfg, or convert it with `kprune darknet convert`")


def zoo_names() -> List[str]:
    """Every zoo model name of every family."""
    return [name for family in FAMILIES.values() for name in family.zoo()]


def family_for_name(name: str) -> DetectorFamily:
    """The family whose zoo lists ``name`` (a Darknet cfg file belongs to the YOLO family).

    Raises:
        ValueError: a name no family knows (the message lists the zoo).
    """
    for family in FAMILIES.values():
        if family.knows(name):
            return family
    raise ValueError(f"{name!r} is not a zoo model or a cfg file; zoo models: {', '.join(zoo_names())}")


def build(name: str, input_size: Optional[int] = None, classes: Optional[int] = None, width: float = 1.0,
          names: Optional[Sequence[str]] = None):
    """A freshly initialised model of any family's zoo name (or a Darknet cfg file).

    Raises:
        ValueError: an unknown name, or overrides the model cannot take.
    """
    return family_for_name(name).build(name, input_size=input_size, classes=classes, width=width, names=names)
