"""Datasets: the TFRecord format and manifest (:mod:`tfrecord`), the tf.data input pipeline
(:mod:`pipeline`) and the YOLO training targets (:mod:`targets`)."""
