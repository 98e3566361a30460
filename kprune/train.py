"""Training of YOLO detectors with Keras ``fit``.

The detector stays a functional model (prunable, savable with safe_mode); :class:`DetectorTrainer`
wraps it only to give ``fit`` a train step that feeds the pipeline's targets to the YOLO loss.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from kprune._keras import keras, tf
from kprune.losses import LossOptions, YoloLoss, loss_terms


class DetectorTrainer(keras.Model):
    """Gives ``fit`` / ``evaluate`` the YOLO loss of ``detector``.

    Args:
        detector: a functional model with DetectionHead outputs.
        loss: the loss (default: :meth:`YoloLoss.from_model`).
    """

    def __init__(self, detector, loss: Optional[YoloLoss] = None, **kwargs):
        super().__init__(**kwargs)
        self.detector = detector
        self.yolo_loss = loss or YoloLoss.from_model(detector)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in loss_terms()}

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
            terms = self.yolo_loss(targets, self.detector(images, training=True))
            # each replica averages over its own images; gradients are summed over replicas
            scaled = terms["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.detector.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return self._update(terms)

    def test_step(self, data):
        images, targets = data
        return self._update(self.yolo_loss(targets, self.detector(images, training=False)))


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
