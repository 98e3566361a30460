"""The Keras model ``fit`` trains: the detector, with its family's loss in the train step."""

from __future__ import annotations

from typing import Dict, Sequence

from kprune import detectors
from kprune._keras import keras, tf
from kprune.detectors.distill import attention_imitation
from kprune.train.slimming import gamma_penalty


def with_features(model, names: Sequence[str]):
    """``model`` with the outputs of the layers ``names`` after its own outputs (the same layers and
    weights, the layers' latest outputs: those of ``model``'s graph when it is the last one built).

    Raises:
        ValueError: a name that is not a layer of ``model`` (the message lists the conv layers).
    """
    known = {layer.name for layer in model.layers}
    missing = [n for n in names if n not in known]
    if missing:
        convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        raise ValueError(f"distill features {missing}: not layers of {model.name!r}; its convs: "
                         f"{', '.join(convs[:12])}{', ...' if len(convs) > 12 else ''}")
    outputs = model.outputs + [model.get_layer(n).get_output_at(-1) for n in names]
    return keras.Model(model.inputs, outputs, name=f"{model.name}_with_features")


def split_features(outputs, count: int):
    """(the model's own outputs, the feature maps) of a :func:`with_features` model's outputs."""
    outputs = list(outputs)
    own = outputs[:-count]
    return (own[0] if len(own) == 1 else own), outputs[-count:]


class DetectorTrainer(keras.Model):
    """Gives ``fit`` / ``evaluate`` the loss of ``detector``'s family.

    Args:
        detector: a functional model of a detector family.
        loss: the loss, a callable ``loss(targets, outputs)`` with ``terms`` (default: the family's,
            with its default options).
        teacher, distill_weight: distillation (:mod:`kprune.detectors.distill`): a frozen model with
            the detector's outputs, whose predictions the detector also learns, the divergence
            weighted by ``distill_weight`` and added to the training loss as the ``distill`` term.
        features, feature_weight: layers (by name, in both models) whose attention maps the detector
            imitates from the teacher's, the ``imitation`` term weighted by ``feature_weight``.
        slimming: λ of the ``slimming`` term ``λ * sum |gamma|`` over the batch norms
            (:mod:`kprune.train.slimming`); 0: none.
    """

    def __init__(self, detector, loss=None, teacher=None, distill_weight: float = 1.0, slimming: float = 0.0,
                 features: Sequence[str] = (), feature_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.detector = detector
        self.detector_loss = loss or detectors.family_of(detector).loss(detector)
        self.teacher, self.distill_weight = teacher, float(distill_weight)
        terms = list(self.detector_loss.terms)
        if teacher is not None:
            teacher.trainable = False
            self.distill = detectors.family_of(detector).distillation(detector)
            terms.insert(len(terms) - 1, "distill")  # "loss" stays last
        self.features, self.feature_weight = list(features), float(feature_weight)
        if self.features:
            if teacher is None:
                raise ValueError(f"feature imitation at {self.features} needs a teacher")
            self.student_view, self.teacher_view = with_features(detector, self.features), with_features(
                teacher, self.features)
            terms.insert(len(terms) - 1, "imitation")
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
            if self.features:
                outputs, features = split_features(self.student_view(images, training=True), len(self.features))
                taught, taught_features = split_features(self.teacher_view(images, training=False), len(self.features))
            else:
                outputs = self.detector(images, training=True)
                taught = self.teacher(images, training=False) if self.teacher is not None else None
            terms = dict(self.detector_loss(targets, outputs))
            if self.teacher is not None:
                distilled = self.distill(outputs, taught)["distill"]
                terms["distill"] = self.distill_weight * distilled
                terms["loss"] = terms["loss"] + terms["distill"]
            if self.features:
                terms["imitation"] = self.feature_weight * attention_imitation(features, taught_features)
                terms["loss"] = terms["loss"] + terms["imitation"]
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
