"""Trunk pre-training: the detector's trunk learns the objects as a classifier of ground-truth crops."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from kprune import detectors
from kprune._keras import keras, tf
from kprune.data.tfrecord import deserialize_sample


def object_crops(manifest, split: str, size: int, limit: Optional[int] = None):
    """Every ground-truth object of a split cut out and resized to ``size`` x ``size`` (RGB in [0, 1]),
    with its label: the data of :func:`pretrain_trunk`."""
    import cv2

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
                   progress: bool = False, seed: int = 0) -> dict:
    """Train the detector's trunk (up to its family's ``trunk_output``) as a classifier of the
    ground-truth objects, cut out and resized to ``crop`` pixels, under a global-average-pooling
    softmax layer that is then thrown away. The analogue of Darknet's ImageNet pre-training: a thin
    YOLOv2 learns shapes far faster this way than from detection alone. ``seed`` fixes the
    classifier layer's initial weights and the order of the crops, so a run is repeatable.

    Returns:
        ``crops``, ``epochs``, ``accuracy`` (last epoch, on the crops), ``seconds``.
    """
    if crop % 32:
        raise ValueError(f"pre-training crop {crop}: must be a multiple of 32")
    began = time.perf_counter()
    images, labels = object_crops(manifest, "train", crop)
    trunk = keras.Model(detector.input, detectors.family_of(detector).trunk_output(detector))
    # the classifier's weights and fit's shuffling draw from the global seed; it is cleared after,
    # because the detection pipeline seeds its own ops (and tf.data refuses tensor seeds under a global one)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((crop, crop, detector.input_shape[-1]))
    features = keras.models.clone_model(trunk, input_tensors=inputs, clone_function=lambda layer: layer).output
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    classifier = keras.Model(inputs, keras.layers.Dense(len(manifest.classes))(pooled))
    classifier.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    try:
        history = classifier.fit(images, labels, batch_size=batch_size, epochs=epochs, verbose=1 if progress else 0)
    finally:
        tf.random.set_seed(None)
    return {"crops": len(images), "epochs": epochs, "accuracy": float(history.history["accuracy"][-1]),
            "seconds": time.perf_counter() - began}
