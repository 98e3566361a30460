"""Custom layers of the Darknet models, all registered for ``.keras`` save/load with safe_mode.

- :class:`Reorg`: YOLOv2's passthrough, in Darknet's exact form or as plain space-to-depth.
- :class:`DarknetBatchNormalization`: batch norm with Darknet's formula.
- :class:`DetectionHead`: identity on the raw output of a head conv, carrying the head metadata
  (kind, anchors, mask, classes, names) so that it travels with the saved model.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from kprune._keras import keras, tf

REORG_MODES = ("darknet", "space_to_depth")
HEAD_KINDS = ("region", "yolo")


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="kprune")(cls)


@_serializable
class Reorg(keras.layers.Layer):
    """YOLOv2's reorg (passthrough) layer: (H, W, C) -> (H/s, W/s, C*s*s).

    Modes:
        ``darknet``: bit-for-bit Darknet. Darknet's reorg reinterprets the NCHW buffer as
            (C/s², s·H, s·W), applies space-to-depth with block s (block offset major), and
            reinterprets the result as (s²·C, H/s, W/s). Weights trained in Darknet need this.
        ``space_to_depth``: ``tf.nn.space_to_depth`` (YAD2K, keras-yolo2); same shape, different
            channel order and spatial grouping.

    Args:
        stride: block size s.
        mode: one of :data:`REORG_MODES`.

    Raises:
        ValueError: unknown mode, stride < 2, or (when built) an input whose height or width is not a
            multiple of s, or (darknet mode) whose channel count is not a multiple of s².
    """

    def __init__(self, stride: int = 2, mode: str = "darknet", **kwargs):
        super().__init__(**kwargs)
        if mode not in REORG_MODES:
            raise ValueError(f"Reorg mode {mode!r} is not one of {REORG_MODES}")
        if int(stride) < 2:
            raise ValueError(f"Reorg stride must be at least 2, got {stride}")
        self.stride = int(stride)
        self.mode = mode

    def build(self, input_shape):
        _, height, width, channels = input_shape
        s = self.stride
        for name, size in (("height", height), ("width", width)):
            if size is not None and size % s:
                raise ValueError(f"layer {self.name}: input {name} {size} is not a multiple of stride {s}")
        if self.mode == "darknet" and channels % (s * s):
            raise ValueError(
                f"layer {self.name}: darknet reorg needs channels divisible by {s * s}, got {channels}"
            )
        super().build(input_shape)

    def call(self, inputs):
        s = self.stride
        if self.mode == "space_to_depth":
            return tf.nn.space_to_depth(inputs, s)
        shape = tf.shape(inputs)
        height, width = shape[1], shape[2]
        channels = inputs.shape[-1]
        x = tf.transpose(inputs, [0, 3, 1, 2])  # the NCHW buffer Darknet works on
        x = tf.reshape(x, [-1, channels // (s * s), height * s, width * s])
        x = tf.transpose(x, [0, 2, 3, 1])
        x = tf.nn.space_to_depth(x, s)  # (N, H, W, C), block offset major
        x = tf.transpose(x, [0, 3, 1, 2])
        x = tf.reshape(x, [-1, channels * s * s, height // s, width // s])
        return tf.transpose(x, [0, 2, 3, 1])

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        s = self.stride
        return tf.TensorShape([n, None if h is None else h // s, None if w is None else w // s, c * s * s])

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: reorg has no weights to prune."""
        return []

    def get_config(self):
        return {**super().get_config(), "stride": self.stride, "mode": self.mode}


@_serializable
class DarknetBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with Darknet's formula.

    Darknet normalizes with ``(x - mean) / (sqrt(variance) + 1e-6)``; Keras' own layer uses
    ``sqrt(variance + epsilon)``, which is visibly different for channels with small variance. The
    weights are Keras' (gamma, beta, moving_mean, moving_variance) and hold exactly the values of the
    Darknet file (scales, biases, rolling_mean, rolling_variance), so conversion is lossless both ways.
    ``epsilon`` is added to the standard deviation, as Darknet does.

    In training mode the batch mean and (biased) variance are used (of the global batch under a
    multi-replica tf.distribute strategy) and the moving statistics updated
    with ``momentum`` (Darknet: 0.99; Darknet's batch variance divides by N - 1, which only matters for
    tiny batches). A layer with ``trainable=False`` always runs in inference mode,
    as Keras 2's BatchNormalization does.
    """

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-6, **kwargs):
        kwargs.pop("axis", None)
        super().__init__(axis=-1, momentum=momentum, epsilon=epsilon, **kwargs)

    def _normalize(self, inputs, mean, variance):
        scale = self.gamma / (tf.sqrt(variance) + self.epsilon)
        offset = self.beta - mean * scale
        return inputs * tf.cast(scale, inputs.dtype) + tf.cast(offset, inputs.dtype)

    @staticmethod
    def _batch_moments(x):
        """Mean and biased variance over all axes but the channels; under a strategy with several
        replicas, over the global batch (so training on N devices normalizes as on one)."""
        axes = list(range(x.shape.rank - 1))
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return tf.nn.moments(x, axes=axes)
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        total, count = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.reduce_sum(x, axes), count])
        mean = total / count
        # a second pass around the global mean: E[x^2] - E[x]^2 loses the small variances in float32
        squares = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.square(x - mean), axes))
        return mean, squares / count

    def call(self, inputs, training=None):
        if training is None:
            training = keras.backend.learning_phase()
        if not self.trainable:
            training = False

        def train_branch():
            mean, variance = self._batch_moments(tf.cast(inputs, tf.float32))
            decay = 1.0 - self.momentum
            self.moving_mean.assign_sub((self.moving_mean - mean) * decay)
            self.moving_variance.assign_sub((self.moving_variance - variance) * decay)
            return self._normalize(inputs, mean, variance)

        def inference_branch():
            return self._normalize(inputs, self.moving_mean, self.moving_variance)

        return tf.__internal__.smart_cond.smart_cond(training, train_branch, inference_branch)

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: batch norm is never pruned (tfmot only knows the exact
        BatchNormalization class, not subclasses)."""
        return []


@_serializable
class DetectionHead(keras.layers.Layer):
    """Identity on a head conv's raw output, (N, H, W, A·(5+classes)), carrying the head metadata.

    Channel ``a·(5+classes) + e`` holds entry e (tx, ty, tw, th, objectness, class scores...) of
    anchor a, as in Darknet's memory layout.

    Args:
        kind: ``region`` (YOLOv2: anchors in grid cells, softmax classes) or ``yolo`` (YOLOv3:
            anchors in input pixels, sigmoid classes).
        anchors: all (w, h) anchor pairs of the cfg section.
        classes: number of classes.
        mask: indices of the anchors this head predicts (yolo); None means all of them.
        names: optional class names, in label order.
        darknet_header: [major, minor, revision, seen] of the .weights file the model came from, so
            that exporting reproduces it.

    Raises:
        ValueError: unknown kind, anchors that are not pairs, classes < 1, a mask out of range, or
            names whose count is not ``classes``.
    """

    def __init__(
        self,
        kind: str,
        anchors: Sequence[Sequence[float]],
        classes: int,
        mask: Optional[Sequence[int]] = None,
        names: Optional[Sequence[str]] = None,
        darknet_header: Optional[Sequence[int]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind {kind!r} is not one of {HEAD_KINDS}")
        anchors = [[float(v) for v in pair] for pair in anchors]
        if not anchors or any(len(pair) != 2 for pair in anchors):
            raise ValueError(f"head anchors must be (w, h) pairs, got {anchors}")
        if int(classes) < 1:
            raise ValueError(f"head classes must be at least 1, got {classes}")
        mask = list(range(len(anchors))) if mask is None else [int(m) for m in mask]
        if any(not 0 <= m < len(anchors) for m in mask):
            raise ValueError(f"head mask {mask} refers to anchors outside 0..{len(anchors) - 1}")
        if names is not None and len(names) != int(classes):
            raise ValueError(f"head has {classes} classes but {len(names)} names were given")
        self.kind = kind
        self.anchors = anchors
        self.classes = int(classes)
        self.mask = mask
        self.names = None if names is None else [str(n) for n in names]
        self.darknet_header = None if darknet_header is None else [int(v) for v in darknet_header]

    @property
    def head_anchors(self) -> List[List[float]]:
        """The (w, h) anchors this head predicts, in channel order."""
        return [self.anchors[m] for m in self.mask]

    @property
    def num_anchors(self) -> int:
        return len(self.mask)

    @property
    def channels(self) -> int:
        return self.num_anchors * (5 + self.classes)

    def build(self, input_shape):
        if input_shape[-1] != self.channels:
            raise ValueError(
                f"layer {self.name}: a {self.kind} head with {self.num_anchors} anchors and "
                f"{self.classes} classes needs {self.channels} channels, got {input_shape[-1]}"
            )
        super().build(input_shape)

    def call(self, inputs):
        return tf.identity(inputs)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_prunable_weights(self) -> list:
        """tfmot's PrunableLayer interface: a head has no weights."""
        return []

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "anchors": self.anchors,
            "classes": self.classes,
            "mask": self.mask,
            "names": self.names,
            "darknet_header": self.darknet_header,
        }


CUSTOM_OBJECTS = {
    "Reorg": Reorg,
    "DarknetBatchNormalization": DarknetBatchNormalization,
    "DetectionHead": DetectionHead,
}


def detection_heads(model) -> List[DetectionHead]:
    """The model's DetectionHead layers in output order.

    Raises:
        ValueError: the model has no DetectionHead among its outputs.
    """
    by_output = {id(layer.output): layer for layer in model.layers if isinstance(layer, DetectionHead)}
    heads = [by_output[id(t)] for t in model.outputs if id(t) in by_output]
    if not heads:
        raise ValueError(f"model {model.name!r} has no detection head among its outputs")
    return heads

