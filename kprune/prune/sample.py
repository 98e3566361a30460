"""Training data for the data-driven criteria (:mod:`kprune.prune.importance`): the first batches of
a converted dataset's training split, in file order and without augmentation (the same batches on
every call), with the targets and loss of the model's detector family."""

from __future__ import annotations

from dataclasses import dataclass

from kprune import detectors
from kprune.data.pipeline import make_dataset

SAMPLE_BATCHES = 8
SAMPLE_BATCH_SIZE = 8


@dataclass
class DetectionSample:
    """``batches_per_score`` batches of ``batch_size`` training images of the dataset ``data``."""

    data: str
    batches_per_score: int = SAMPLE_BATCHES
    batch_size: int = SAMPLE_BATCH_SIZE

    def __post_init__(self):
        if self.batches_per_score < 1 or self.batch_size < 1:
            raise ValueError(f"criterion data: {self.batches_per_score} batches of {self.batch_size} images; "
                             "need at least one of one")

    def batches(self, model):
        family = detectors.family_of(model)
        dataset = make_dataset(self.data, "train", model.input_shape[1], self.batch_size,
                               encoder=family.target_encoder(model))
        yield from dataset.take(self.batches_per_score)

    def loss(self, model):
        return detectors.family_of(model).loss(model)
