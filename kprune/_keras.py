"""The one place that imports Keras.

tensorflow-model-optimization only works with Keras 2, which TensorFlow >= 2.16 ships as the separate
``tf_keras`` package. ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow resolves ``tf.keras``,
otherwise TensorFlow (and tfmot, which uses ``tf.keras``) would pick Keras 3. Every other kprune module
does ``from kprune._keras import keras, tf``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("TF_USE_LEGACY_KERAS", "1") not in ("1", "true", "True"):
    raise ImportError(
        "kprune needs Keras 2 (tf_keras) but TF_USE_LEGACY_KERAS is set to "
        f"{os.environ['TF_USE_LEGACY_KERAS']!r}; unset it or set it to 1"
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402


def _check_keras_version() -> None:
    """Raise ImportError if Keras 3 slipped in where Keras 2 is required."""
    if not keras.__version__.startswith("2."):
        raise ImportError(f"tf_keras {keras.__version__} is not Keras 2")
    tf_keras_module = tf.keras.__name__
    if not tf_keras_module.startswith("tf_keras"):
        raise ImportError(
            f"tf.keras resolves to {tf_keras_module!r}, i.e. Keras 3: TensorFlow was imported and "
            "tf.keras used before TF_USE_LEGACY_KERAS=1 was set. Import kprune before using tf.keras."
        )


_check_keras_version()

__all__ = ["keras", "tf"]
