"""The learning-rate schedule of training runs: warm-up, then cosine, step or constant decay."""

from __future__ import annotations

import math

from kprune._keras import keras, tf


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
