"""A training run: Keras ``fit`` in a run directory, with checkpoints, resume, validation, mAP,
early stopping and the saved models.

The detector stays a functional model (prunable, savable with safe_mode); :class:`DetectorTrainer`
wraps it only to give ``fit`` a train step that feeds the pipeline's targets to its family's loss.

A run directory holds ``config.yaml`` (the resolved config), ``log.csv``, ``tensorboard/``,
``checkpoints/last`` and ``checkpoints/best`` (model, optimizer and epoch), ``best.keras``,
``final.keras`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import tensorflow_model_optimization as tfmot

from kprune import detectors
from kprune._keras import keras, tf
from kprune.config import build, dump_yaml
from kprune.data.pipeline import Augment, make_dataset
from kprune.data.tfrecord import read_manifest
from kprune.evaluate import evaluate_detections, predict_dataset
from kprune.fileio import write_json_atomic
from kprune.models.io import load_model, save_model
from kprune.models.sparsity import keep_masks, pruning_wrappers, strip
from kprune.models.variants import BF16_FLAGS, resolve_policy, variant, with_policy
from kprune.train.batchnorm import batch_norm_layers, recalibrate_batch_norm
from kprune.train.config import DENSE_TEACHER, TrainConfig, resolve_dataset
from kprune.train.detector import build_detector, class_names, set_anchors, set_trainable, variable_input_view
from kprune.train.distribute import is_chief, make_strategy
from kprune.train.pretrain import pretrain_trunk
from kprune.train.schedule import WarmupCosine
from kprune.train.slimming import gamma_stats
from kprune.train.trainer import DetectorTrainer


class TrainingError(RuntimeError):
    """Training stopped: the loss became NaN or Inf (the message names the step)."""


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


#: what collective ops raise on the workers left when a peer of a multi-worker cluster dies
LOST_PEER = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
             tf.errors.DeadlineExceededError)

def _reason(error) -> str:
    """The line of a TensorFlow error that says why collectives failed (its first line is generic)."""
    lines = [line.strip() for line in error.message.splitlines() if line.strip()]
    said = [line for line in lines if "aborted by" in line]
    return f"{type(error).__name__}: {(said or lines or [''])[0]}"


#: what ``init`` says in ``config.yaml`` of a run that trained a model given in memory
GIVEN_MODEL = "(a model given in memory)"


class TrainingRun:
    """One training run in its directory (see the module docstring)."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True, prepare=None, model=None,
                 teacher=None):
        if model is not None:  # the model in memory replaces the config's source
            config = dataclasses.replace(config, model=None, cfg=None, weights=None, names=None, init=GIVEN_MODEL)
        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.data = resolve_dataset(config.dataset)
        self.manifest = read_manifest(self.data)
        for split in ("train", "val"):
            if split not in self.manifest.splits or self.manifest.num_images(split) == 0:
                raise ValueError(f"dataset {self.data}: split {split!r} is missing or empty")
        self.strategy = make_strategy(config.distribution)
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
            if model is not None and self.replicas > 1:  # replicas train variables made in the scope
                copy = keras.models.clone_model(model)
                copy.set_weights(model.get_weights())
                model = copy
            self.detector, self.label_map = build_detector(config, self.manifest.classes, model)
            tf.random.set_seed(None)
            self.family = detectors.family_of(self.detector)
            if config.multiscale and not getattr(self.family, "multiscale", True):
                raise ValueError(f"multiscale: a {self.family.name} model's default boxes are fixed to its input "
                                 "size; train it at one size")
            if config.final_size is not None:
                self.family.check_input_size(self.detector, config.final_size)
            self.loss_options = self.family.make_loss_options(self.detector, config.loss)
            self.anchor_fit = set_anchors(self.detector, config, self.manifest)
            self.precision = resolve_policy(config.precision)
            self.detector = with_policy(self.detector, self.precision)
            self.steps = config.steps_per_epoch or max(1, self.manifest.num_images("train") // config.batch_size)
            # tfmot pruning wrappers: kept zeros, or a sparsity schedule from ``prepare(model, steps)``
            if config.keep_sparsity:
                self.detector = keep_masks(self.detector)
            if prepare is not None:
                self.detector = prepare(self.detector, self.steps)
            self.pruning = bool(pruning_wrappers(self.detector))
            if self.pruning and self.replicas > 1:
                # tfmot's wrappers reduce their masked weights across replicas in every step, and the
                # replicas of one step issue those collectives in different orders
                raise ValueError(f"distribution {config.distribution}: tfmot's pruning wrappers (keep_sparsity, "
                                 f"pruning schedules) train on one device only; use distribution: default")
            set_trainable(self.detector, config.mode)
            if config.bn_momentum is not None:
                for layer in batch_norm_layers(self.detector):
                    layer.momentum = config.bn_momentum
            # multi-scale batches need a model that takes any size; it shares the detector's layers
            network = variable_input_view(self.detector) if config.multiscale else self.detector
            teacher = self._teacher(teacher)
            if teacher is not None and config.multiscale:
                teacher = variable_input_view(teacher)
            distill = config.distill or {}
            self.trainer = DetectorTrainer(network, self._loss(), teacher=teacher,
                                           distill_weight=distill.get("weight", 1.0), slimming=config.slimming,
                                           features=distill.get("features", ()),
                                           feature_weight=distill.get("feature_weight", 1.0))
            self.gamma_before = gamma_stats(self.detector) if config.slimming else None
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
        # the run directory; the others write to a scratch folder of their own, removed at the end.
        # A resume reads the chief's checkpoint on every worker (the run directory must be on storage
        # all workers see), so the workers start again from identical weights
        self.chief = is_chief(self.strategy)
        folder = self.out if self.chief else Path(tempfile.mkdtemp(prefix="kprune-worker-"))
        self.writes_to = folder
        self.last = tf.train.CheckpointManager(checkpoint, str(folder / "checkpoints" / "last"), max_to_keep=1)
        self.best = tf.train.CheckpointManager(checkpoint, str(folder / "checkpoints" / "best"), max_to_keep=1)
        self.state = {}
        if resume:
            latest = tf.train.latest_checkpoint(str(self.out / "checkpoints" / "last"))
            if latest is None:
                raise ValueError(f"--resume: no checkpoint in {self.out / 'checkpoints' / 'last'}")
            checkpoint.restore(latest)
            state_path = self.out / "state.json"
            self.state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def _loss(self):
        return self.family.loss(self.detector, self.loss_options)

    def _teacher(self, given):
        """The distillation teacher: ``given`` (a model in memory) or the config's ``.keras`` file."""
        if not self.config.distill:
            return None
        if given is not None:
            return given
        name = self.config.distill["teacher"]
        if name == DENSE_TEACHER:
            raise ValueError("distill teacher: dense is the unpruned model of a pruning (kprune prune --distill, "
                             "or an experiment's retrain); for a training run give a .keras file")
        teacher = load_model(name)
        if teacher.input_shape[1:] != self.detector.input_shape[1:] and not self.config.multiscale:
            raise ValueError(f"distill teacher {name}: input {teacher.input_shape[1:]}, the model's is "
                             f"{self.detector.input_shape[1:]}")
        return teacher

    def dataset(self, split: str, training: bool, start_epoch: int = 0, fixed_size: bool = False):
        c = self.config
        size = self.detector.input_shape[1]
        augment = build(Augment, c.augment, "augment")  # [low, high] lists become tuples
        dataset = make_dataset(
            self.manifest, split, size, c.batch_size, training=training, augment=augment, letterbox=c.letterbox,
            encoder=self.encoder, multiscale=c.multiscale if training and not fixed_size else None,
            seed=c.seed, start_epoch=start_epoch, repeat=training, label_map=self.label_map,
            drop_remainder=training or self.replicas > 1,  # replicas need equal, non-empty shares
        )
        # every worker runs the same seeded pipeline and takes its share of each global batch (a
        # split is one file, so tf.data's default, sharding by file, cannot serve two workers)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def write_json(self, name: str, payload) -> None:
        write_json_atomic(self.writes_to / name, payload)

    def plain_detector(self):
        """The detector as it is saved: a copy without pruning wrappers, in float32, at ``final_size``."""
        detector = self.detector
        if self.pruning:
            detector = strip(detector)
        return variant(detector, "float32", self.config.final_size)

    def save_detector(self, name: str) -> None:
        save_model(self.plain_detector(), self.writes_to / name)

    def evaluate(self, split: str = "val", model=None) -> dict:
        """mAP on ``split`` of ``model``, by default the detector as it is saved (:meth:`plain_detector`)."""
        detections, truths = predict_dataset(model or self.plain_detector(), self.manifest, split, self.config.batch_size,
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
        self.writes_to.mkdir(parents=True, exist_ok=True)
        dump_yaml(dataclasses.asdict(c), self.writes_to / "config.yaml")
        if not self.chief and self.progress:
            resolver = self.strategy.cluster_resolver
            print(f"{resolver.task_type} {resolver.task_id} (not the chief): the chief writes the run directory {self.out}; this worker writes to {self.writes_to} "
                  f"(removed at the end)")
        if self.anchor_fit is not None and self.chief:
            self.write_json("anchors.json", self.anchor_fit)
            if self.progress and self.anchor_fit["mean_iou"] is not None:
                fit = self.anchor_fit
                print(f"{fit['text']} (mean IoU {fit['mean_iou_before']:.3f} with the model's, {fit['mean_iou']:.3f} now)")
        if c.precision == "auto" and self.progress and self.chief:
            print(f"precision auto: {self.precision} (bfloat16 only on a CPU with native bfloat16: "
                  f"{', '.join(BF16_FLAGS)})")
        start = int(self.epoch.numpy())
        monitor = "val_map50" if c.eval_every else "val_loss"
        run_callback = RunCallback(self, monitor)
        if self.pruning:
            callbacks = [*callbacks, tfmot.sparsity.keras.UpdatePruningStep()]
        callbacks = [
            *callbacks,
            run_callback,
            keras.callbacks.CSVLogger(str(self.writes_to / "log.csv"), append=start > 0),
            keras.callbacks.TensorBoard(str(self.writes_to / "tensorboard"), update_freq="epoch", write_graph=False),
        ]
        began = time.perf_counter()
        if start == 0 and c.pretrain_epochs and not self.state.get("pretrained"):
            with self.strategy.scope():
                self.state["pretrained"] = pretrain_trunk(self.detector, self.manifest, c.pretrain_epochs,
                                                          c.pretrain_crop, progress=self.progress, seed=c.seed)
            done, chance = self.state["pretrained"], 1.0 / len(self.manifest.classes)
            print(f"trunk pre-training: {done['accuracy']:.0%} of {done['crops']} object crops classified right "
                  f"after {done['epochs']} epochs (chance {chance:.0%})"
                  + (": the trunk learned next to nothing" if done["accuracy"] < 1.5 * chance else ""))
        if start < c.epochs and not self.state.get("stopped_early"):
            try:
                self.trainer.fit(
                    self.dataset("train", True, start), validation_data=self.dataset("val", False),
                    validation_freq=c.validate_every, epochs=c.epochs, initial_epoch=start,
                    steps_per_epoch=self.steps, callbacks=callbacks, verbose=1 if self.progress else 0,
                )
            except LOST_PEER as exc:
                if c.distribution != "multi-worker":
                    raise
                raise TrainingError(
                    f"the multi-worker cluster lost a worker in epoch {run_callback.epoch + 1} "
                    f"({_reason(exc)}); the last checkpoint is "
                    f"{tf.train.latest_checkpoint(str(self.out / 'checkpoints' / 'last'))} (epoch "
                    f"{int(self.epoch.numpy())}): start every worker again with --resume") from None
        if run_callback.failure:
            raise TrainingError(f"{run_callback.failure}; stopped. The last good checkpoint is "
                                f"{self.last.latest_checkpoint} (epoch {int(self.epoch.numpy())})")
        seconds = time.perf_counter() - began
        if c.recalibrate_bn:  # deterministic (seeded data of epoch `epochs`), so a resume redoes it alike
            batches = (images for images, _ in self.dataset("train", True, c.epochs, fixed_size=True)
                       .take(c.recalibrate_bn))
            with self.strategy.scope():
                recalibrate_batch_norm(self.detector, batches)
        self.final_model = self.plain_detector()
        save_model(self.final_model, self.writes_to / "final.keras")
        metrics = self.evaluate(model=self.final_model)
        metrics.update({"epochs": int(self.epoch.numpy()), "train_seconds": seconds,
                        "input_size": c.final_size or self.detector.input_shape[1], "replicas": self.replicas,
                        "images_per_second": (int(self.epoch.numpy()) - start) * self.steps * c.batch_size / max(seconds, 1e-9)})
        metrics.pop("coco_summary", None)
        if c.slimming:
            metrics.update(bn_gamma_before=self.gamma_before, bn_gamma_after=gamma_stats(self.final_model))
        self.write_json("metrics.json", metrics)
        if not self.chief:
            shutil.rmtree(self.writes_to, ignore_errors=True)
        return metrics


def train(config: TrainConfig, resume: bool = False, progress: bool = True, callbacks: Sequence = (),
          prepare=None, teacher=None) -> dict:
    """Run (or resume) a training run; returns the final metrics. ``prepare(model, steps_per_epoch)``
    may return the detector with tfmot pruning wrappers (see :mod:`kprune.prune.unstructured`);
    they are then trained with their schedules and stripped from every saved model."""
    return TrainingRun(config, resume=resume, progress=progress, prepare=prepare, teacher=teacher).fit(callbacks)


def train_model(model, config: TrainConfig, progress: bool = True, callbacks: Sequence = (), prepare=None,
                teacher=None):
    """Train a model in memory as ``config`` says (its ``model`` / ``init`` / ``cfg`` are not used);
    returns ``(trained model, metrics)``. The run directory is written as by :func:`train`."""
    run = TrainingRun(config, progress=progress, prepare=prepare, model=model, teacher=teacher)
    metrics = run.fit(callbacks)
    return run.final_model, metrics
