"""The Keras model ``fit`` trains: the detector, with its family's loss in the train step."""

from __future__ import annotations

from typing import Dict

from kprune import detectors
from kprune._keras import keras, tf
from kprune.train.slimming import gamma_penalty


class DetectorTrainer(keras.Model):
    """Gives ``fit`` / ``evaluate`` the loss of ``detector``'s family.

    Args:
        detector: a functional model of a detector family.
        loss: the loss, a callable ``loss(targets, outputs)`` with ``terms`` (default: the family's,
            with its default options).
        teacher, distill_weight: distillation (:mod:`kprune.detectors.distill`): a frozen model with
            the detector's outputs, whose predictions the detector also learns, the divergence
            weighted by ``distill_weight`` and added to the training loss as the ``distill`` term.
        slimming: λ of the ``slimming`` term ``λ * sum |gamma|`` over the batch norms
            (:mod:`kprune.train.slimming`); 0: none.
    """

    def __init__(self, detector, loss=None, teacher=None, distill_weight: float = 1.0, slimming: float = 0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.detector = detector
        self.detector_loss = loss or detectors.family_of(detector).loss(detector)
        self.teacher, self.distill_weight = teacher, float(distill_weight)
        terms = list(self.detector_loss.terms)
        if teacher is not None:
            teacher.trainable = False
            self.distill = detectors.family_of(detector).distillation(detector)
            terms.insert(len(terms) - 1, "distill")  # "loss" stays last
        self.slimming = float(slimming)
        if self.slimming:
            terms.insert(len(terms) - 1, "slimming")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in terms}

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
            outputs = self.detector(images, training=True)
            terms = dict(self.detector_loss(targets, outputs))
            if self.teacher is not None:
                distilled = self.distill(outputs, self.teacher(images, training=False))["distill"]
                terms["distill"] = self.distill_weight * distilled
                terms["loss"] = terms["loss"] + terms["distill"]
            if self.slimming:
                terms["slimming"] = self.slimming * gamma_penalty(self.detector)
                terms["loss"] = terms["loss"] + terms["slimming"]
            # each replica averages over its own images; gradients are summed over replicas
            scaled = terms["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.detector.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return self._update(terms)

    def test_step(self, data):
        images, targets = data
        return self._update(self.detector_loss(targets, self.detector(images, training=False)))
