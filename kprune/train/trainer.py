"""The Keras model ``fit`` trains: the detector, with its family's loss in the train step."""

from __future__ import annotations

from typing import Dict

from kprune import detectors
from kprune._keras import keras, tf


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
