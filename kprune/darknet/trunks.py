"""The classification trunks Darknet detectors are built on, recognised in any cfg.

YOLOv2 starts with the 23 layers of Darknet-19 (``darknet19_448.conv.23``), YOLOv3 with the 75 of
Darknet-53 (``darknet53.conv.74``), the tiny models with 12 conv and max-pool layers. A cfg whose
first layers have the shape of one of these trunks (layer kinds, kernel sizes, strides, routes and
shortcuts: filter counts may differ, so width-scaled and pruned cfgs are recognised) has that
backbone, whatever the file is called. The longest matching trunk wins.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Tuple

from kprune.darknet.cfg import DarknetCfg, Section, read_cfg
from kprune.darknet.zoo import cfg_path

#: trunk name -> (zoo cfg it is taken from, number of layers)
TRUNKS: Dict[str, Tuple[str, int]] = {
    "darknet19": ("yolov2", 23),
    "darknet53": ("yolov3", 75),
    "darknet-tiny": ("yolov2-tiny", 12),
}


def _signature(section: Section) -> tuple:
    p = section.params
    if section.kind == "convolutional":
        return ("conv", p["size"], p["stride"], p["batch_normalize"], p["activation"])
    if section.kind == "maxpool":
        return ("maxpool", p["size"], p["stride"])
    if section.kind == "route":
        return ("route", tuple(i - section.index for i in p["layers"]), p["groups"], p["group_id"])
    if section.kind == "shortcut":
        return ("shortcut", p["from"] - section.index, p["activation"])
    return (section.kind,)


@lru_cache(maxsize=None)
def _trunk_signature(name: str) -> tuple:
    source, length = TRUNKS[name]
    return tuple(_signature(s) for s in read_cfg(cfg_path(source)).layers[:length])


def trunk_end(cfg: DarknetCfg) -> Optional[int]:
    """Index of the last trunk layer of ``cfg``, or None when no known trunk starts it (or the cfg
    is the bare trunk, with nothing after it)."""
    signature = tuple(_signature(s) for s in cfg.layers)
    best = None
    for name in TRUNKS:
        trunk = _trunk_signature(name)
        if len(signature) > len(trunk) and signature[:len(trunk)] == trunk:
            if best is None or len(trunk) > best:
                best = len(trunk)
    return None if best is None else best - 1
