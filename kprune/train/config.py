"""Training configs: :class:`TrainConfig` (saved as ``config.yaml`` in the run directory) and the
dataset names it accepts."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Dict, List, Optional

from typing_extensions import Required, TypedDict

from kprune import detectors
from kprune.config import Float, Int, build, schema, strict_keys
from kprune.data.pipeline import Augment
from kprune.models.bn_formulas import bn_formula
from kprune.models.variants import check_policy

MODES = ("full", "head", "new-head")
DENSE_TEACHER = "dense"  # distill.teacher: the unpruned model, passed in memory by the pruning
DISTRIBUTIONS = ("default", "mirrored", "multi-worker")
# Dataset names and the folders `make data-synth` / the data_tools converters write them to.
DATASETS = {"synth": "data/synth", "coco5": "data/coco5", "kitti": "data/kitti", "voc0712": "data/voc0712"}


@strict_keys
class Distillation(TypedDict, total=False):
    """``distill:`` of a training config (see :class:`TrainConfig`)."""

    teacher: Required[str]  # a .keras file, or dense: the unpruned model of a pruning
    weight: Float  # of the head-output divergence (default 1)
    features: List[str]  # layers whose attention maps the model imitates (default none)
    feature_weight: Float  # of the imitation term (default 1)


@schema
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run directory.

    The model comes from one of: ``model`` (a zoo name of any detector family, fresh weights), ``init`` (a ``.keras``
    model) or ``cfg`` + ``weights`` (Darknet files). ``mode``: ``full`` trains everything, ``head``
    only the last conv of each head and keeps the model's classes (dataset classes are mapped onto
    them by name, case-insensitively, or through ``class_map``), ``new-head`` replaces the last convs
    by new ones for the dataset's classes. ``full`` with a ``class_map`` also keeps the model's
    classes (everything trains). ``names``: a class names file for a ``cfg`` + ``weights`` model
    (Darknet's .names; ``kprune/models/cfg/coco.names`` for the COCO weights). ``bn_formula``: the
    batch-norm formula of such a model, ``original`` or ``alexeyab`` (default: that of the Darknet its
    cfg was written for, :func:`kprune.darknet.cfg.default_bn_formula`).

    Batch norm: Darknet's momentum 0.99 suits 100k-step runs; over a few hundred steps the moving
    statistics lag far behind the weights, so training uses ``bn_momentum`` (0.9), and at the end the
    moving mean and variance are set to the average batch statistics of ``recalibrate_bn`` (seeded,
    augmented) training batches at the input size (0: off).

    ``validate_every``: the validation loss is computed every that many epochs (about 10 % of an
    epoch's time on the synthetic data); the best checkpoint and early stopping only see those
    epochs, unless ``eval_every`` makes them follow mAP.

    ``keep_sparsity``: the zeros of the initial model's kernels (an unstructured-pruned model) stay
    zero: tfmot wrappers with those fixed masks are trained and stripped before every save.

    ``pretrain_epochs`` > 0 first trains the trunk as a classifier of ground-truth crops of
    ``pretrain_crop`` pixels (:func:`pretrain_trunk`), before any detection training.

    ``anchors``: ``kmeans`` fits the heads' anchors to the training boxes (YOLOv2's dimension
    clusters, :mod:`kprune.data.anchors`), or a list of (w, h) pairs in the head's units (grid
    cells for YOLOv2, input pixels for YOLOv3); default: the model's. Only for YOLO heads trained
    from scratch (``model``, or mode ``new-head``); an SSD's default boxes belong to its architecture.

    ``precision``: ``mixed_bfloat16`` trains with bfloat16 compute (float32 weights), which CPUs with
    AVX512-BF16 or AMX run faster and other CPUs about 7x slower (:mod:`kprune.models.variants`);
    ``auto`` picks it only on a CPU-only machine whose CPU has native bfloat16, else float32, and
    prints the choice. Saved models are float32.

    ``final_size``: the input size of the saved models (``best.keras``, ``final.keras``) and of every
    mAP evaluation, when it differs from the training size. The same weights run at any multiple of
    32; run larger than trained, YOLOv2 sees small objects bigger.

    ``distill``: ``{teacher: T, weight: W}`` adds ``W`` x the divergence of the model's raw outputs
    from the teacher's (:mod:`kprune.detectors.distill`) to every training step's loss; the teacher
    (a ``.keras`` file, or ``dense``: the unpruned model, where a pruning passes it in memory) is
    frozen and runs in inference mode. Validation losses stay the detection loss alone. With
    ``features: [LAYER, ...]`` the model also imitates the teacher's feature maps at those layers,
    ``feature_weight`` x the distance of their attention maps
    (:func:`kprune.detectors.distill.attention_imitation`), which compares layers of different
    widths, as a pruned layer and its dense original are.

    ``slimming``: λ of an L1 penalty on the batch-norm scales (network slimming,
    :mod:`kprune.train.slimming`), for a later ``bn-gamma`` pruning; the run's metrics give the
    distribution of |gamma| before and after (``bn_gamma_before``, ``bn_gamma_after``).
    """

    dataset: str = "synth"
    model: Optional[str] = None
    init: Optional[str] = None
    cfg: Optional[str] = None
    weights: Optional[str] = None
    names: Optional[str] = None
    bn_formula: Optional[str] = None
    input_size: Optional[Int] = None
    width: Float = 1.0
    mode: str = "full"
    class_map: Dict[str, str] = field(default_factory=dict)
    epochs: Int = 10
    batch_size: Int = 16
    lr: Float = 1e-3
    optimizer: str = "adam"
    warmup_epochs: Float = 1.0
    decay: str = "cosine"
    decay_epochs: List[Int] = field(default_factory=list)
    augment: Dict[str, object] = field(default_factory=dict)
    multiscale: Optional[List[Int]] = None
    letterbox: bool = True
    loss: Dict[str, object] = field(default_factory=dict)
    seed: Int = 0
    distribution: str = "default"
    bn_momentum: Optional[Float] = 0.9
    recalibrate_bn: Int = 32
    pretrain_epochs: Int = 0
    pretrain_crop: Int = 64
    keep_sparsity: bool = False
    early_stopping: Optional[Int] = None
    eval_every: Int = 0
    validate_every: Int = 1
    steps_per_epoch: Optional[Int] = None
    anchors: Optional[object] = None  # kmeans or [[w, h], ...]: checked by _check_anchors
    precision: str = "float32"
    final_size: Optional[Int] = None
    distill: Optional[Distillation] = None
    slimming: Float = 0.0
    out: str = "runs/train"

    def __post_init__(self):
        sources = [name for name in ("model", "init", "cfg") if getattr(self, name)]
        if len(sources) > 1:
            raise ValueError(f"give one of model, init or cfg + weights, not {' and '.join(sources)}")
        if not sources:
            self.model = "yolov2"
        if bool(self.cfg) != bool(self.weights):
            raise ValueError("cfg and weights go together")
        if self.names and not self.cfg:
            raise ValueError("names: only for a cfg + weights model (zoo and .keras models carry their names)")
        if self.bn_formula is not None:
            if not self.cfg:
                raise ValueError("bn_formula: only for a cfg + weights model (a .keras model carries its formula)")
            bn_formula(self.bn_formula)
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution {self.distribution!r}: the tf.distribute strategy, one of "
                             f"{', '.join(DISTRIBUTIONS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r}: choose adam or sgd")
        for name in ("epochs", "batch_size", "validate_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr = {self.lr}: must be > 0")
        if self.slimming < 0:
            raise ValueError(f"slimming = {self.slimming}: the L1 weight on batch-norm scales must be >= 0")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"bn_momentum = {self.bn_momentum}: must be in [0, 1)")
        self._check_anchors()
        check_policy(self.precision)
        if self.final_size is not None and (int(self.final_size) != self.final_size or self.final_size < 32):
            raise ValueError(f"final_size = {self.final_size}: must be a whole number of pixels, at least 32")
        self._check_nested("loss", self._loss_options())
        self._check_nested("augment", Augment)
        self._check_distill()

    def _check_distill(self) -> None:
        if self.distill is None:
            return
        weight = self.distill.get("weight", 1.0)
        if weight <= 0:
            raise ValueError(f"distill weight = {weight!r}: a number > 0")
        if self.distill.get("feature_weight", 1.0) < 0:
            raise ValueError(f"distill feature_weight = {self.distill['feature_weight']!r}: a number >= 0")
        self.distill = {**self.distill, "weight": float(weight)}

    def _check_anchors(self) -> None:
        if self.anchors is None:
            return
        if isinstance(self.anchors, str):
            if self.anchors != "kmeans":
                raise ValueError(f"anchors = {self.anchors!r}: expected kmeans or a list of [w, h] pairs")
        else:
            try:
                pairs = [[float(v) for v in pair] for pair in self.anchors]
            except (TypeError, ValueError):
                pairs = None
            if not pairs or any(len(p) != 2 or min(p) <= 0 for p in pairs):
                raise ValueError(f"anchors = {self.anchors!r}: expected kmeans or a list of positive [w, h] pairs")
            self.anchors = pairs
        if self.mode == "head" or (not self.model and self.mode != "new-head"):
            raise ValueError(f"anchors = {self.anchors!r}: only for a head trained from scratch (model: NAME, "
                             "or mode: new-head); a trained head predicts relative to its own anchors")

    def _loss_options(self):
        """The loss options class of the model's family (YOLO's for cfg + weights; for a ``.keras``
        file, whose family is known only once it is loaded, any family's keys, checked by the family
        when the model is loaded)."""
        if self.model:
            return detectors.family_for_name(self.model).loss_options
        if self.cfg:
            return detectors.get("yolo").loss_options
        names = {f.name for family in detectors.FAMILIES.values() for f in dataclasses.fields(family.loss_options)}
        return schema(dataclasses.make_dataclass("LossOptions", [(n, object, field(default=None)) for n in sorted(names)]))

    def _check_nested(self, name: str, cls) -> None:
        """``loss:`` and ``augment:`` hold fields of their schema classes, validated as they are."""
        build(cls, getattr(self, name) or {}, name)


def dense_distillation(weight: float, like: Optional[dict] = None) -> Optional[dict]:
    """``distill:`` from the unpruned model with ``weight`` (None for a weight of 0), keeping the other
    keys of ``like`` (a config's own ``distill:``, e.g. its ``features``)."""
    if not weight:
        return None
    return {**(like or {}), "teacher": DENSE_TEACHER, "weight": float(weight)}


def resolve_dataset(name_or_path: str) -> str:
    """The folder of a dataset name (synth, coco5, kitti) or path.

    Raises:
        ValueError: the folder has no ``dataset.json``; the message says how to make it.
    """
    folder = DATASETS.get(name_or_path, name_or_path)
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        how = {
            "synth": "make data-synth",
            "coco5": "python -m data_tools coco --coco-dir COCO_DIR --out data/coco5",
            "kitti": "python -m data_tools kitti --kitti-dir KITTI_DIR --out data/kitti",
            "voc0712": "python -m data_tools voc --voc-dir VOCdevkit/ --train 2007:trainval,2012:trainval "
                       "--val 2007:test --out data/voc0712",
        }.get(name_or_path, "python -m data_tools coco|kitti|voc|synth ... --out " + folder)
        raise ValueError(f"dataset {name_or_path!r}: no converted dataset in {folder} (make it with `{how}`)")
    return folder
