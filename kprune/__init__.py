"""kprune: prune, retrain, evaluate and export YOLO object detectors with TensorFlow / tf_keras.

Importing the package loads nothing heavy; TensorFlow is loaded by the modules that need it,
always through :mod:`kprune._keras`.
"""

__version__ = "0.1.0"
