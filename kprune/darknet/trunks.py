"""The classification trunks Darknet detectors are built on, recognised in any cfg.

YOLOv2 starts with the 23 layers of Darknet-19 (``darknet19_448.conv.23``), YOLOv3 with the 75 of
Darknet-53 (``darknet53.conv.74``), the tiny models with 12 conv and max-pool layers. A cfg whose
first layers have the shape of one of these trunks (layer kinds, kernel sizes, strides,
activations, routes with their channel splits, and shortcuts: filter counts may differ, so
width-scaled and pruned cfgs are recognised) has that backbone, whatever the file is called. The
longest matching trunk wins.

The AlexeyAB fork's trunks end where the backbone proper ends, before the neck (SPP, SPP-CSP, the
FPN / PAN convs), not where the fork's partial weight files end (``yolov4.conv.137`` and
``yolov4-tiny.conv.29`` hold neck and head layers too). Layer indices are cfg indices:

- ``cspdarknet53`` (yolov4): layers 0-104. Layer 104 is the 1x1 mish conv that closes the last CSP
  stage (it joins conv 102 with the stage's shortcut branch from 87); from 105 on the activations
  are leaky: convs 105-107 and the SPP max-pools 108-113 are YOLOv4's neck.
- ``cspdarknet53-tiny`` (yolov4-tiny): layers 0-26. Layer 26 is the 3x3 conv of 512 filters after
  the third CSP block and its max-pool, the last layer of CSPDarknet53-tiny; conv 27 (the 1x1 both
  heads branch from) and conv 28 (the first head's 3x3) are the neck and head that
  ``yolov4-tiny.conv.29`` also covers.
- ``cspdarknet53-csp`` (yolov4-csp, scaled-YOLOv4): layers 0-98. Layer 98 is the 1x1 conv that
  closes the last CSP stage; conv 99 is already the SPP-CSP block's shortcut branch (route 112
  joins it with the pooled branch).
- ``elan-tiny`` (yolov7-tiny): layers 0-32. Layer 32 is the 1x1 conv of 512 filters that closes the
  last ELAN block; conv 33 is the SPP-CSP block's shortcut branch (route 43).
- ``e-elan`` (yolov7): layers 0-57. Layer 57 is the 1x1 conv of 1024 filters that closes the last
  ELAN block (YOLOv7's backbone ends there); conv 58 is the SPP-CSP-C block's shortcut branch
  (route 71).
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
    "cspdarknet53": ("yolov4", 105),
    "cspdarknet53-tiny": ("yolov4-tiny", 27),
    "cspdarknet53-csp": ("yolov4-csp", 99),
    "elan-tiny": ("yolov7-tiny", 33),
    "e-elan": ("yolov7", 58),
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
