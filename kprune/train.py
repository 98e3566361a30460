"""Training of YOLO detectors with Keras ``fit``: run directories, checkpoints, resume, schedules,
distribution strategies, and the three retraining modes.

The detector stays a functional model (prunable, savable with safe_mode); :class:`DetectorTrainer`
wraps it only to give ``fit`` a train step that feeds the pipeline's targets to the YOLO loss.

A run directory holds ``config.yaml`` (the resolved config), ``log.csv``, ``tensorboard/``,
``checkpoints/last`` and ``checkpoints/best`` (model, optimizer and epoch), ``best.keras``,
``final.keras`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from kprune._keras import keras, tf
from kprune import detectors
from kprune.models.head import class_mapping
from kprune.models.variants import check_policy, variant, with_policy

MODES = ("full", "head", "new-head")
STRATEGIES = ("default", "mirrored", "multi-worker")
# Dataset names and the folders `make data-synth` / the data_tools converters write them to.
DATASETS = {"synth": "data/synth", "coco5": "data/coco5", "kitti": "data/kitti"}


class TrainingError(RuntimeError):
    """Training stopped: the loss became NaN or Inf (the message names the step)."""


class DetectorTrainer(keras.Model):
    """Gives ``fit`` / ``evaluate`` the loss of ``detector``'s family.

    Args:
        detector: a functional model of a detector family.
        loss: the loss, a callable ``loss(targets, outputs)`` with ``terms`` (default: the family's,
            with its default options).
    """

    def __init__(self, detector, loss=None, **kwargs):
        super().__init__(**kwargs)
        self.detector = detector
        self.detector_loss = loss or detectors.family_of(detector).loss(detector)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.detector_loss.terms}

    def call(self, images, training=False):
        return self.detector(images, training=training)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _update(self, terms: Dict[str, tf.Tensor]):
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        images, targets = data
        with tf.GradientTape() as tape:
            terms = self.detector_loss(targets, self.detector(images, training=True))
            # each replica averages over its own images; gradients are summed over replicas
            scaled = terms["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.detector.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return self._update(terms)

    def test_step(self, data):
        images, targets = data
        return self._update(self.detector_loss(targets, self.detector(images, training=False)))


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to ``peak * final``
    (or ``step`` decay: times ``gamma`` at each of ``boundaries``)."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, final: float = 0.01,
                 decay: str = "cosine", boundaries=(), gamma: float = 0.1):
        if decay not in ("cosine", "step", "constant"):
            raise ValueError(f"learning-rate decay {decay!r}: choose cosine, step or constant")
        if peak <= 0 or total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"learning rate {peak}, total steps {total_steps}, warm-up {warmup_steps}: "
                             "need a positive rate, at least one step and a non-negative warm-up")
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)
        self.final, self.decay, self.boundaries, self.gamma = float(final), decay, list(boundaries), float(gamma)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        if self.decay == "cosine":
            after = self.peak * (self.final + (1 - self.final) * 0.5 * (1 + tf.cos(math.pi * progress)))
        elif self.decay == "step":
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]) if self.boundaries else 0.0
            after = self.peak * tf.pow(self.gamma, passed)
        else:
            after = tf.constant(self.peak)
        return tf.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "final": self.final, "decay": self.decay, "boundaries": self.boundaries, "gamma": self.gamma}


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run directory.

    The model comes from one of: ``model`` (a zoo name of any detector family, fresh weights), ``init`` (a ``.keras``
    model) or ``cfg`` + ``weights`` (Darknet files). ``mode``: ``full`` trains everything, ``head``
    only the last conv of each head and keeps the model's classes (dataset classes are mapped onto
    them by name, case-insensitively, or through ``class_map``), ``new-head`` replaces the last convs
    by new ones for the dataset's classes. ``full`` with a ``class_map`` also keeps the model's
    classes (everything trains). ``names``: a class names file for a ``cfg`` + ``weights`` model
    (Darknet's .names; ``kprune/models/cfg/coco.names`` for the COCO weights).

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
    clusters, :mod:`kprune.data.anchors`), or a list of (w, h) pairs in the head's units (grid cells
    for YOLOv2, input pixels for YOLOv3); default: the model's. Only for heads trained from scratch
    (``model``, or mode ``new-head``).

    ``precision``: ``mixed_bfloat16`` trains with bfloat16 compute (float32 weights), which CPUs with
    AVX512-BF16 or AMX run faster (:mod:`kprune.models.variants`); saved models are float32.

    ``final_size``: the input size of the saved models (``best.keras``, ``final.keras``) and of every
    mAP evaluation, when it differs from the training size. The same weights run at any multiple of
    32; run larger than trained, YOLOv2 sees small objects bigger.
    """

    dataset: str = "synth"
    model: Optional[str] = None
    init: Optional[str] = None
    cfg: Optional[str] = None
    weights: Optional[str] = None
    names: Optional[str] = None
    input_size: Optional[int] = None
    width: float = 1.0
    mode: str = "full"
    class_map: Dict[str, str] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    warmup_epochs: float = 1.0
    decay: str = "cosine"
    decay_epochs: List[int] = field(default_factory=list)
    augment: Dict[str, object] = field(default_factory=dict)
    multiscale: Optional[List[int]] = None
    letterbox: bool = True
    loss: Dict[str, object] = field(default_factory=dict)
    seed: int = 0
    strategy: str = "default"
    bn_momentum: Optional[float] = 0.9
    recalibrate_bn: int = 32
    pretrain_epochs: int = 0
    pretrain_crop: int = 64
    keep_sparsity: bool = False
    early_stopping: Optional[int] = None
    eval_every: int = 0
    validate_every: int = 1
    steps_per_epoch: Optional[int] = None
    anchors: Union[None, str, List[List[float]]] = None
    precision: str = "float32"
    final_size: Optional[int] = None
    out: str = "runs/train"

    def __post_init__(self):
        self._coerce()
        sources = [name for name in ("model", "init", "cfg") if getattr(self, name)]
        if len(sources) > 1:
            raise ValueError(f"give one of model, init or cfg + weights, not {' and '.join(sources)}")
        if not sources:
            self.model = "yolov2"
        if bool(self.cfg) != bool(self.weights):
            raise ValueError("cfg and weights go together")
        if self.names and not self.cfg:
            raise ValueError("names: only for a cfg + weights model (zoo and .keras models carry their names)")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r}: choose adam or sgd")
        for name in ("epochs", "batch_size", "validate_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr = {self.lr}: must be > 0")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"bn_momentum = {self.bn_momentum}: must be in [0, 1)")
        self._check_anchors()
        check_policy(self.precision)
        if self.final_size is not None and (int(self.final_size) != self.final_size or self.final_size < 32):
            raise ValueError(f"final_size = {self.final_size}: must be a whole number of pixels, at least 32")
        self._check_nested("loss", self._loss_options())
        from kprune.data.pipeline import Augment

        self._check_nested("augment", Augment)

    def _coerce(self):
        """YAML 1.1 reads ``1e-3`` as a string: convert numbers by the field types, refusing nonsense."""
        kinds = {"input_size": int, "epochs": int, "batch_size": int, "seed": int, "recalibrate_bn": int,
                 "pretrain_epochs": int, "pretrain_crop": int,
                 "eval_every": int, "validate_every": int, "early_stopping": int, "steps_per_epoch": int,
                 "final_size": int,
                 "width": float, "lr": float, "warmup_epochs": float, "bn_momentum": float}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if value is None or isinstance(value, bool):
                continue
            try:
                converted = kind(float(value)) if kind is int else kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} = {value!r}: expected a number") from None
            if kind is int and converted != float(value):
                raise ValueError(f"{name} = {value!r}: expected a whole number")
            setattr(self, name, converted)

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
        """The loss options dataclass of the model's family (YOLO's for cfg + weights; for a ``.keras``
        file, known only once it is loaded, a dataclass with every family's keys)."""
        import dataclasses

        if self.model:
            return detectors.family_for_name(self.model).loss_options
        if self.cfg:
            return detectors.get("yolo").loss_options
        fields = {f.name: (f.name, f.type, f) for family in detectors.FAMILIES.values()
                  for f in dataclasses.fields(family.loss_options)}
        return dataclasses.make_dataclass("AnyLossOptions", list(fields.values()))

    def _check_nested(self, name: str, cls) -> None:
        """``loss:`` and ``augment:`` hold fields of their dataclasses; anything else is refused."""
        values = getattr(self, name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{name}: expected a mapping of {cls.__name__} fields, got {values!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


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
        }.get(name_or_path, "python -m data_tools coco|kitti|voc|synth ... --out " + folder)
        raise ValueError(f"dataset {name_or_path!r}: no converted dataset in {folder} (make it with `{how}`)")
    return folder


def build_detector(config: TrainConfig, classes: Sequence[str]):
    """The detector a config asks for, fitted to the dataset's ``classes`` (see :class:`TrainConfig`).

    Returns:
        (model, label_map): label_map maps dataset labels to model labels (None when identical).

    Raises:
        ValueError: the model's classes do not fit the dataset in mode ``full``.
    """
    from kprune.darknet.builder import build_model
    from kprune.darknet.weights import load_weights
    from kprune.models.io import load_model

    size = config.input_size
    if config.model:
        keep = config.mode == "head"
        model = detectors.build(config.model, input_size=size, width=config.width,
                                classes=None if keep else len(classes), names=None if keep else list(classes))
    elif config.init:
        model = load_model(config.init)
        if size and model.input_shape[1] != size:
            raise ValueError(f"{config.init} takes {model.input_shape[1]} px inputs; input_size {size} "
                             "needs the model rebuilt from its cfg")
    else:
        from kprune.models.inference import read_names

        names = read_names(config.names) if config.names else None
        model = build_model(config.cfg, names=names, **({"input_size": size} if size else {}))
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
        raise ValueError(f"anchors = {config.anchors!r}: a {family.name} model has no anchors to set (its default "
                         "boxes are part of its architecture)")
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


def object_crops(manifest, split: str, size: int, limit: Optional[int] = None):
    """Every ground-truth object of a split cut out and resized to ``size`` x ``size`` (RGB in [0, 1]),
    with its label: the data of :func:`pretrain_trunk`."""
    import cv2

    from kprune.data.tfrecord import deserialize_sample

    images, labels = [], []
    for record in tf.data.TFRecordDataset(manifest.files(split)).take(limit or -1):
        sample = deserialize_sample(record.numpy())
        pixels = tf.io.decode_jpeg(sample.encoded, channels=3).numpy()
        scale = np.array([sample.width, sample.height] * 2)
        for box, label in zip(sample.boxes, sample.labels):
            x0, y0, x1, y1 = np.round(box * scale).astype(int)
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                images.append(cv2.resize(pixels[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA))
                labels.append(label)
    return np.asarray(images, np.float32) / 255.0, np.asarray(labels, np.int64)


def pretrain_trunk(detector, manifest, epochs: int, crop: int = 64, batch_size: int = 32, lr: float = 2e-3,
                   progress: bool = False) -> dict:
    """Train the detector's trunk (everything up to its first head conv) as a classifier of the
    ground-truth objects, cut out and resized to ``crop`` pixels, under a global-average-pooling
    softmax layer that is then thrown away. The analogue of Darknet's ImageNet pre-training: a thin
    YOLOv2 learns shapes far faster this way than from detection alone.

    Returns:
        ``crops``, ``epochs``, ``accuracy`` (last epoch, on the crops), ``seconds``.
    """
    if crop % 32:
        raise ValueError(f"pre-training crop {crop}: must be a multiple of 32")
    began = time.perf_counter()
    images, labels = object_crops(manifest, "train", crop)
    conv = next(iter(detectors.family_of(detector).predictor_convs(detector).values()))
    trunk = keras.Model(detector.input, conv.input)
    inputs = keras.Input((crop, crop, detector.input_shape[-1]))
    features = keras.models.clone_model(trunk, input_tensors=inputs, clone_function=lambda layer: layer).output
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    classifier = keras.Model(inputs, keras.layers.Dense(len(manifest.classes))(pooled))
    classifier.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    history = classifier.fit(images, labels, batch_size=batch_size, epochs=epochs, verbose=1 if progress else 0)
    return {"crops": len(images), "epochs": epochs, "accuracy": float(history.history["accuracy"][-1]),
            "seconds": time.perf_counter() - began}


def batch_norm_layers(model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate_batch_norm(model, batches) -> int:
    """Recompute the moving mean and variance of every trainable batch norm as the plain average of
    the batch statistics over ``batches`` (forward passes in training mode, no weight update);
    returns the number of batches used. Frozen layers (``trainable=False``) keep their statistics."""
    layers = batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    count = 0
    try:
        for images in batches:
            for layer in layers:  # moving = (k * moving + batch) / (k + 1): a running mean
                layer.momentum = count / (count + 1.0)
            model(images, training=True)  # eager, so each call sees the new momentum
            count += 1
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return count


def is_chief(strategy) -> bool:
    """True except on the non-chief workers of a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster or resolver.task_type is None:
        return True
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0  # Keras' rule without a chief task


def make_strategy(name: str):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


class RunCallback(keras.callbacks.Callback):
    """Stops on a NaN / Inf loss (naming the step; that batch's update has already reached the
    weights in memory, which are therefore not saved), saves the last and best checkpoints each
    epoch, evaluates mAP every ``eval_every`` epochs, and stops early after ``early_stopping`` epochs
    without improvement. Its state lives in ``state.json``, so a resumed run continues it."""

    def __init__(self, run, monitor: str):
        super().__init__()
        self.run, self.monitor = run, monitor
        self.best = run.state.get("best")
        self.best_epoch = run.state.get("best_epoch", 0)
        self.failure = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        value = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(value):
            self.failure = f"loss became {value} at epoch {self.epoch + 1}, step {batch + 1}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.failure:
            return
        logs = logs if logs is not None else {}
        if self.run.config.eval_every and (epoch + 1) % self.run.config.eval_every == 0:
            logs["val_map50"] = self.run.evaluate()["map50"]
        self.run.epoch.assign(epoch + 1)
        self.run.last.save()
        value = logs.get(self.monitor)
        better = value is not None and (self.best is None or (value > self.best if "map" in self.monitor else value < self.best))
        if better:
            self.best, self.best_epoch = float(value), epoch + 1
            self.run.best.save()
            self.run.save_detector("best.keras")
        patience = self.run.config.early_stopping
        stopped = bool(patience) and epoch + 1 - self.best_epoch >= patience
        if stopped:
            self.model.stop_training = True
        self.run.state.update({"epoch": epoch + 1, "best": self.best, "best_epoch": self.best_epoch,
                               "monitor": self.monitor, "stopped_early": stopped})
        self.run.write_json("state.json", self.run.state)


class TrainingRun:
    """One training run in its directory (see the module docstring)."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True, prepare=None):
        from kprune.data.tfrecord import read_manifest

        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.data = resolve_dataset(config.dataset)
        self.manifest = read_manifest(self.data)
        for split in ("train", "val"):
            if split not in self.manifest.splits or self.manifest.num_images(split) == 0:
                raise ValueError(f"dataset {self.data}: split {split!r} is missing or empty")
        self.strategy = make_strategy(config.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % self.replicas:
            raise ValueError(f"batch size {config.batch_size} does not split evenly over {self.replicas} replicas")
        for split in ("train", "val"):
            if self.manifest.num_images(split) < config.batch_size and (split == "train" or self.replicas > 1):
                raise ValueError(f"dataset {self.data}: split {split!r} has {self.manifest.num_images(split)} images, "
                                 f"fewer than one batch of {config.batch_size}")
        with self.strategy.scope():
            # the same fresh weights for the same seed; the global seed is cleared again because the
            # pipeline seeds its own ops per epoch (and tf.data refuses tensor seeds under a global one)
            keras.utils.set_random_seed(config.seed)
            self.detector, self.label_map = build_detector(config, self.manifest.classes)
            tf.random.set_seed(None)
            self.family = detectors.family_of(self.detector)
            if config.multiscale and not getattr(self.family, "multiscale", True):
                raise ValueError(f"multiscale: a {self.family.name} model's default boxes are fixed to its input "
                                 "size; train it at one size")
            if config.final_size is not None:
                self.family.check_input_size(self.detector, config.final_size)
            self.loss_options = self.family.make_loss_options(self.detector, config.loss)
            self.anchor_fit = set_anchors(self.detector, config, self.manifest)
            self.detector = with_policy(self.detector, config.precision)
            self.steps = config.steps_per_epoch or max(1, self.manifest.num_images("train") // config.batch_size)
            # tfmot pruning wrappers: kept zeros, or a sparsity schedule from ``prepare(model, steps)``
            if config.keep_sparsity:
                from kprune.prune.unstructured import keep_masks

                self.detector = keep_masks(self.detector)
            if prepare is not None:
                self.detector = prepare(self.detector, self.steps)
            from kprune.prune.unstructured import pruning_wrappers

            self.pruning = bool(pruning_wrappers(self.detector))
            set_trainable(self.detector, config.mode)
            if config.bn_momentum is not None:
                for layer in batch_norm_layers(self.detector):
                    layer.momentum = config.bn_momentum
            # multi-scale batches need a model that takes any size; it shares the detector's layers
            network = variable_input_view(self.detector) if config.multiscale else self.detector
            self.trainer = DetectorTrainer(network, self._loss())
            self.encoder = self.family.target_encoder(self.detector, self.loss_options)
            schedule = WarmupCosine(
                config.lr, self.steps * config.epochs, int(round(config.warmup_epochs * self.steps)),
                decay=config.decay, boundaries=[e * self.steps for e in config.decay_epochs])
            optimizer = (keras.optimizers.Adam(schedule) if config.optimizer == "adam"
                         else keras.optimizers.SGD(schedule, momentum=0.9))
            self.trainer.compile(optimizer=optimizer)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            checkpoint = tf.train.Checkpoint(detector=self.detector, optimizer=optimizer, epoch=self.epoch)
        # under multi-worker training every worker saves (collective ops), but only the chief into
        # the run directory; the others write to a scratch folder of their own
        self.chief = is_chief(self.strategy)
        folder = self.out if self.chief else Path(tempfile.mkdtemp(prefix="kprune-worker-"))
        self.writes_to = folder
        self.last = tf.train.CheckpointManager(checkpoint, str(folder / "checkpoints" / "last"), max_to_keep=1)
        self.best = tf.train.CheckpointManager(checkpoint, str(folder / "checkpoints" / "best"), max_to_keep=1)
        self.state = {}
        if resume:
            if self.last.latest_checkpoint is None:
                raise ValueError(f"--resume: no checkpoint in {self.out / 'checkpoints' / 'last'}")
            checkpoint.restore(self.last.latest_checkpoint)
            state_path = self.out / "state.json"
            self.state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def _loss(self):
        return self.family.loss(self.detector, self.loss_options)

    def dataset(self, split: str, training: bool, start_epoch: int = 0, fixed_size: bool = False):
        from kprune.data.pipeline import Augment, make_dataset

        c = self.config
        size = self.detector.input_shape[1]
        augment = Augment(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.augment.items()})
        return make_dataset(
            self.manifest, split, size, c.batch_size, training=training, augment=augment, letterbox=c.letterbox,
            encoder=self.encoder, multiscale=c.multiscale if training and not fixed_size else None,
            seed=c.seed, start_epoch=start_epoch, repeat=training, label_map=self.label_map,
            drop_remainder=training or self.replicas > 1,  # replicas need equal, non-empty shares
        )

    def write_json(self, name: str, payload) -> None:
        from kprune.fileio import write_json_atomic

        write_json_atomic(self.writes_to / name, payload)

    def plain_detector(self):
        """The detector as it is saved: a copy without pruning wrappers, in float32, at ``final_size``."""
        detector = self.detector
        if self.pruning:
            from kprune.prune.unstructured import strip

            detector = strip(detector)
        return variant(detector, "float32", self.config.final_size)

    def save_detector(self, name: str) -> None:
        from kprune.models.io import save_model

        save_model(self.plain_detector(), self.writes_to / name)

    def evaluate(self, split: str = "val") -> dict:
        """mAP of the detector as it is saved (:meth:`plain_detector`) on ``split``."""
        from kprune.evaluate import evaluate_detections, predict_dataset

        detections, truths = predict_dataset(self.plain_detector(), self.manifest, split, self.config.batch_size,
                                             letterbox=self.config.letterbox, label_map=self.label_map)
        # head mode scores in the model's classes (the dataset's mapped onto them)
        names = self.manifest.classes if self.label_map is None else class_names(self.detector)
        return evaluate_detections(detections, truths, names)

    def fit(self, callbacks: Sequence = ()) -> dict:
        """Train to ``config.epochs``, evaluate the final model, write ``final.keras`` and
        ``metrics.json``; returns the metrics. ``callbacks`` are added to Keras' list.

        Raises:
            TrainingError: the loss became NaN or Inf (the last good checkpoint is kept).
        """
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        from kprune.config import dump_yaml

        dump_yaml(dataclasses.asdict(c), self.out / "config.yaml")
        if self.anchor_fit is not None and self.chief:
            self.write_json("anchors.json", self.anchor_fit)
            if self.progress and self.anchor_fit["mean_iou"] is not None:
                from kprune.data.anchors import format_anchors

                fit = self.anchor_fit
                print(f"anchors fitted to the training boxes: {format_anchors(fit['anchors'][0])} "
                      f"(mean IoU {fit['mean_iou_before']:.3f} with the model's, {fit['mean_iou']:.3f} now)")
        start = int(self.epoch.numpy())
        monitor = "val_map50" if c.eval_every else "val_loss"
        run_callback = RunCallback(self, monitor)
        if self.pruning:
            import tensorflow_model_optimization as tfmot

            callbacks = [*callbacks, tfmot.sparsity.keras.UpdatePruningStep()]
        callbacks = [
            *callbacks,
            run_callback,
            keras.callbacks.CSVLogger(str(self.out / "log.csv"), append=start > 0),
            keras.callbacks.TensorBoard(str(self.out / "tensorboard"), update_freq="epoch", write_graph=False),
        ]
        began = time.perf_counter()
        if start == 0 and c.pretrain_epochs and not self.state.get("pretrained"):
            with self.strategy.scope():
                self.state["pretrained"] = pretrain_trunk(self.detector, self.manifest, c.pretrain_epochs,
                                                          c.pretrain_crop, progress=self.progress)
        if start < c.epochs and not self.state.get("stopped_early"):
            self.trainer.fit(
                self.dataset("train", True, start), validation_data=self.dataset("val", False),
                validation_freq=c.validate_every, epochs=c.epochs, initial_epoch=start, steps_per_epoch=self.steps,
                callbacks=callbacks,
                verbose=1 if self.progress else 0,
            )
        if run_callback.failure:
            raise TrainingError(f"{run_callback.failure}; stopped. The last good checkpoint is "
                                f"{self.last.latest_checkpoint} (epoch {int(self.epoch.numpy())})")
        seconds = time.perf_counter() - began
        if c.recalibrate_bn:  # deterministic (seeded data of epoch `epochs`), so a resume redoes it alike
            batches = (images for images, _ in self.dataset("train", True, c.epochs, fixed_size=True)
                       .take(c.recalibrate_bn))
            with self.strategy.scope():
                recalibrate_batch_norm(self.detector, batches)
        self.save_detector("final.keras")
        metrics = self.evaluate()
        metrics.update({"epochs": int(self.epoch.numpy()), "train_seconds": seconds,
                        "input_size": c.final_size or self.detector.input_shape[1],
                        "images_per_second": (int(self.epoch.numpy()) - start) * self.steps * c.batch_size / max(seconds, 1e-9)})
        metrics.pop("coco_summary", None)
        self.write_json("metrics.json", metrics)
        return metrics


def class_names(model) -> List[str]:
    """The class names stored in a model's head (or their indices as text)."""
    family = detectors.family_of(model)
    return family.class_names(model) or [str(i) for i in range(family.num_classes(model))]


def train(config: TrainConfig, resume: bool = False, progress: bool = True, callbacks: Sequence = (),
          prepare=None) -> dict:
    """Run (or resume) a training run; returns the final metrics. ``prepare(model, steps_per_epoch)``
    may return the detector with tfmot pruning wrappers (see :mod:`kprune.prune.unstructured`);
    they are then trained with their schedules and stripped from every saved model."""
    return TrainingRun(config, resume=resume, progress=progress, prepare=prepare).fit(callbacks)
