"""Datasets: the TFRecord format and manifest (:mod:`tfrecord`), the tf.data input pipeline
(:mod:`pipeline`, which runs a detector family's target encoder on each batch) and the box shapes of
a dataset with their clusters (:mod:`anchors`)."""
