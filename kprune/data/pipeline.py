"""The tf.data input pipeline: read shards, decode, fit to the model's input, augment, batch, and
compute the training targets, all with TensorFlow ops (no py_function), in parallel.

Each element is ``(images, targets)``: images (B, S, S, 3) float32 in [0, 1]; targets a dict with

- ``boxes`` (B, max_boxes, 4) normalised xyxy in the network input, zeros for padding;
- ``labels`` (B, max_boxes) int32, -1 for padding;
- ``ignore`` (B, max_ignore, 4) normalised xyxy regions to ignore, zeros for padding;
- with an encoder, its targets (``true_boxes`` and one dict per head, see :mod:`targets`);
- with ``with_meta``: ``source_id``, ``image_hw`` (original size), ``scale_xy`` and ``offset_xy``
  (input_px = image_px * scale + offset, the :class:`~kprune.models.head.ImageTransform` of each image).

Without augmentation an image is placed exactly as :func:`kprune.models.head.preprocess_image` places
it (letterbox with 0.5 grey, or plain resize), so evaluation sees what inference sees.

Randomness comes from stateless ops whose seeds are (seed, epoch, position in the epoch): with a
``seed`` the whole stream (shuffle order, augmentation, multi-scale sizes) is the same on every run,
different from one epoch to the next, and a resumed run sees the same epochs as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from typing import Optional, Sequence, Tuple

from kprune._keras import tf
from kprune.config import Float, schema
from kprune.data.tfrecord import Manifest, parse_example, read_manifest

GREY = 0.5


@schema(frozen=True)
class Augment:
    """Training augmentation (Darknet's jitter / hue / saturation / exposure in spirit).

    Attributes:
        flip: probability of a horizontal flip.
        scale: range of the random zoom relative to the letterboxed size (drawn log-uniformly).
        aspect: range of the random aspect-ratio change (width / height factor, log-uniform).
        translate: largest shift of the image centre, as a fraction of the input size.
        hue: largest hue shift, as a fraction of the hue circle.
        saturation, value: ranges of the multiplicative saturation and value (exposure) change.
        min_box_size: boxes smaller than this many input pixels in width or height are dropped.
        min_visible: boxes with less than this fraction of their area left inside the input are dropped.
    """

    flip: Float = 0.5
    scale: Tuple[Float, Float] = (0.7, 1.3)
    aspect: Tuple[Float, Float] = (0.8, 1.25)
    translate: Float = 0.2
    hue: Float = 0.05
    saturation: Tuple[Float, Float] = (0.67, 1.5)
    value: Tuple[Float, Float] = (0.67, 1.5)
    min_box_size: Float = 2.0
    min_visible: Float = 0.25

    def __post_init__(self):
        for name in ("scale", "aspect", "saturation", "value"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"Augment.{name} = ({low}, {high}): need 0 < low <= high")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"Augment.flip = {self.flip}: a probability in [0, 1]")
        if not 0.0 <= self.translate < 1.0 or not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"Augment.translate = {self.translate} must be in [0, 1), hue = {self.hue} in [0, 0.5]")


def _uniform(seed, low, high, log=False):
    low, high = tf.cast(low, tf.float32), tf.cast(high, tf.float32)
    if log:
        return tf.exp(tf.random.stateless_uniform([], seed, tf.math.log(low), tf.math.log(high)))
    return tf.random.stateless_uniform([], seed, low, high)


def _seeds(seed, count):
    """``count`` independent stateless seeds from one."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def _placement(hw, size, letterbox: bool, augment: Optional[Augment], seed):
    """Resized (height, width) and (dx, dy) offset of the image in the square input, as int32."""
    h, w = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
    s = tf.cast(size, tf.float32)
    if letterbox:
        sx = sy = tf.minimum(s / w, s / h)
    else:
        sx, sy = s / w, s / h
    if augment is not None:
        k_scale, k_aspect, k_dx, k_dy = _seeds(seed, 4)
        zoom = _uniform(k_scale, *augment.scale, log=True)
        stretch = tf.sqrt(_uniform(k_aspect, *augment.aspect, log=True))
        sx, sy = sx * zoom * stretch, sy * zoom / stretch
    new_w = tf.maximum(1, tf.cast(tf.round(w * sx), tf.int32))
    new_h = tf.maximum(1, tf.cast(tf.round(h * sy), tf.int32))
    size_i = tf.cast(size, tf.int32)
    dx, dy = (size_i - new_w) // 2, (size_i - new_h) // 2
    if augment is not None:
        shift = augment.translate * s
        dx += tf.cast(tf.round(_uniform(k_dx, -shift, shift)), tf.int32)
        dy += tf.cast(tf.round(_uniform(k_dy, -shift, shift)), tf.int32)
        # keep at least one pixel row/column of the image inside the input
        dx = tf.clip_by_value(dx, 1 - new_w, size_i - 1)
        dy = tf.clip_by_value(dy, 1 - new_h, size_i - 1)
    return new_h, new_w, dx, dy


def _place(image, new_h, new_w, dx, dy, size):
    """Resize ``image`` (float, [0, 1]) to (new_h, new_w) and put it at (dx, dy) on a grey square."""
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear")
    x0, y0 = tf.maximum(0, -dx), tf.maximum(0, -dy)  # part cut off on the left / top
    x1, y1 = tf.minimum(new_w, size - dx), tf.minimum(new_h, size - dy)
    visible = resized[y0:y1, x0:x1]
    left, top = tf.maximum(dx, 0), tf.maximum(dy, 0)
    padding = [[top, size - top - (y1 - y0)], [left, size - left - (x1 - x0)], [0, 0]]
    return tf.pad(visible, padding, constant_values=GREY)


def _move_boxes(boxes, new_h, new_w, dx, dy, size):
    """Normalised image boxes -> normalised input boxes (before clipping)."""
    scale = tf.cast(tf.stack([new_w, new_h, new_w, new_h]), tf.float32)
    offset = tf.cast(tf.stack([dx, dy, dx, dy]), tf.float32)
    return (boxes * scale + offset) / tf.cast(size, tf.float32)


def _clip_boxes(boxes, size, min_size: float, min_visible: float):
    """Clip to [0, 1]; returns (clipped boxes, keep mask)."""
    clipped = tf.clip_by_value(boxes, 0.0, 1.0)
    wh = (clipped[:, 2:4] - clipped[:, 0:2]) * tf.cast(size, tf.float32)
    area = tf.reduce_prod(boxes[:, 2:4] - boxes[:, 0:2], axis=-1)
    kept_area = tf.reduce_prod(clipped[:, 2:4] - clipped[:, 0:2], axis=-1)
    keep = (wh[:, 0] >= min_size) & (wh[:, 1] >= min_size) & (kept_area >= min_visible * area) & (kept_area > 0)
    return clipped, keep


def _flip(image, boxes, ignore):
    def mirror(b):
        return tf.stack([1.0 - b[:, 2], b[:, 1], 1.0 - b[:, 0], b[:, 3]], axis=-1)

    return tf.image.flip_left_right(image), mirror(boxes), mirror(ignore)


def _hsv_jitter(image, augment: Augment, seed):
    k_hue, k_sat, k_val = _seeds(seed, 3)
    hsv = tf.image.rgb_to_hsv(image)
    hue = tf.math.floormod(hsv[..., 0] + _uniform(k_hue, -augment.hue, augment.hue), 1.0)
    sat = tf.clip_by_value(hsv[..., 1] * _uniform(k_sat, *augment.saturation, log=True), 0.0, 1.0)
    val = tf.clip_by_value(hsv[..., 2] * _uniform(k_val, *augment.value, log=True), 0.0, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, sat, val], axis=-1))


def _pad(tensor, length: int, value):
    """First ``length`` rows of ``tensor``, padded with ``value`` to exactly ``length``."""
    tensor = tensor[:length]
    padding = [[0, length - tf.shape(tensor)[0]]] + [[0, 0]] * (len(tensor.shape) - 1)
    return tf.pad(tensor, padding, constant_values=value)


def load_example(
    features,
    seed,
    size,
    letterbox: bool = True,
    augment: Optional[Augment] = None,
    max_boxes: int = 64,
    max_ignore: int = 32,
):
    """One parsed example -> (image (size, size, 3) float32, dict of boxes, labels, ignore and meta)."""
    image = tf.image.convert_image_dtype(tf.io.decode_jpeg(features["encoded"], channels=3), tf.float32)
    hw = tf.shape(image)[0:2]
    k_place, k_flip, k_colour = _seeds(seed, 3)
    new_h, new_w, dx, dy = _placement(hw, size, letterbox, augment, k_place)
    image = _place(image, new_h, new_w, dx, dy, size)
    boxes = _move_boxes(features["boxes"], new_h, new_w, dx, dy, size)
    ignore = _move_boxes(features["ignore"], new_h, new_w, dx, dy, size)
    labels = features["labels"]
    if augment is not None:
        boxes, keep = _clip_boxes(boxes, size, augment.min_box_size, augment.min_visible)
        boxes, labels = tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)
        ignore, keep_ignore = _clip_boxes(ignore, size, 0.0, 0.0)
        ignore = tf.boolean_mask(ignore, keep_ignore)
        if augment.flip > 0:
            flipped = tf.random.stateless_uniform([], k_flip) < augment.flip
            image, boxes, ignore = tf.cond(
                flipped, lambda: _flip(image, boxes, ignore), lambda: (image, boxes, ignore)
            )
        image = _hsv_jitter(image, augment, k_colour)
    static = size if isinstance(size, int) else None
    image.set_shape([static, static, 3])
    scale_xy = tf.cast(tf.stack([new_w, new_h]), tf.float32) / tf.cast(tf.stack([hw[1], hw[0]]), tf.float32)
    return image, {
        "boxes": _pad(boxes, max_boxes, 0.0),
        "labels": _pad(labels, max_boxes, -1),
        "ignore": _pad(ignore, max_ignore, 0.0),
        "source_id": features["source_id"],
        "image_hw": hw,
        "scale_xy": scale_xy,
        "offset_xy": tf.cast(tf.stack([dx, dy]), tf.float32),
    }


def check_input_size(size: int, what: str) -> int:
    """``size`` as an int; ValueError naming ``what`` unless it is a whole number of pixels, at least
    32. (What a model takes beyond that is its family's rule:
    :meth:`kprune.detectors.base.DetectorFamily.check_input_size`.)"""
    if isinstance(size, bool) or int(size) != size or size < 32:
        raise ValueError(f"{what} {size}: must be a whole number of pixels, at least 32")
    return int(size)


def steps_per_epoch(data, split: str, batch_size: int) -> int:
    """Full batches in one pass over a split (the training pipeline drops the last partial batch)."""
    manifest = data if isinstance(data, Manifest) else read_manifest(data)
    return max(1, manifest.num_images(split) // batch_size)


def make_dataset(
    data,
    split: str,
    image_size: int,
    batch_size: int,
    training: bool = False,
    augment: Optional[Augment] = None,
    letterbox: bool = True,
    encoder=None,
    multiscale: Optional[Tuple[int, int]] = None,
    seed: Optional[int] = None,
    start_epoch: int = 0,
    max_boxes: Optional[int] = None,
    max_ignore: Optional[int] = None,
    shuffle_buffer: int = 2048,
    repeat: bool = False,
    with_meta: bool = False,
    label_map: Optional[Sequence[int]] = None,
    drop_remainder: Optional[bool] = None,
    num_parallel_calls: Optional[int] = None,
) -> tf.data.Dataset:
    """The batched input pipeline of one split of a converted dataset.

    Epoch ``e`` of the stream is a fixed function of ``(seed, e)``: its shuffle order, augmentation
    and multi-scale sizes. A run resumed at epoch ``e`` (``start_epoch=e``) therefore sees exactly
    the data the uninterrupted run saw. For several epochs in one stream use ``repeat=True`` with
    :func:`steps_per_epoch` batches per epoch; without ``repeat`` every iteration of the dataset
    gives epoch ``start_epoch`` again.

    Args:
        data: the dataset folder (with ``dataset.json``) or its :class:`Manifest`.
        split: ``train``, ``val``, ...
        image_size: the square network input size in pixels.
        batch_size: images per batch.
        training: shuffle, augment (``augment`` or the default :class:`Augment`) and drop the last
            incomplete batch of each epoch. Evaluation (False) keeps the file order and every image.
        augment: augmentation settings when training; ignored otherwise.
        letterbox: keep the aspect ratio and pad with grey (Darknet's letterbox), else stretch.
        encoder: a detector family's target encoder
            (:meth:`~kprune.detectors.base.DetectorFamily.target_encoder`); its targets join each batch.
        multiscale: (smallest, largest) input size: each batch gets a random multiple of 32 in this
            range (training only).
        seed: makes the stream reproducible; without it a random seed is drawn.
        start_epoch: the first epoch of the stream.
        max_boxes, max_ignore: boxes and ignore regions per image after padding (default: the most
            any image of the split has, from the manifest, so nothing is cut).
        shuffle_buffer: examples held for shuffling.
        repeat: epochs ``start_epoch``, ``start_epoch + 1``, ... one after the other, forever.
        with_meta: add ``source_id``, ``image_hw``, ``scale_xy`` and ``offset_xy`` to the targets
            (for evaluation: with augmentation they describe the zoom and shift, not the flip).
        label_map: the model label of each dataset label (a model that keeps its own classes).
        drop_remainder: drop the last incomplete batch of each epoch (default: when training).
        num_parallel_calls: parallel decode/augment calls (default: tf.data.AUTOTUNE).

    Raises:
        ValueError: a bad size, batch size or multi-scale range, a label map of the wrong length, or a
            missing split or shard.
    """
    manifest = data if isinstance(data, Manifest) else read_manifest(data)
    files = manifest.files(split)
    image_size = check_input_size(image_size, "image size")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: must be >= 1")
    sizes = None
    if training and multiscale is not None:
        low, high = (check_input_size(s, "multi-scale size") for s in multiscale)
        if low % 32 or high % 32:
            raise ValueError(f"multi-scale range ({low}, {high}): sizes go in steps of 32, so give multiples of 32")
        if low > high:
            raise ValueError(f"multi-scale range ({low}, {high}): smallest above largest")
        sizes = tf.constant(list(range(low, high + 1, 32)), tf.int32)
    augment = (augment or Augment()) if training else None
    base = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
    calls = num_parallel_calls or tf.data.AUTOTUNE
    buffer = min(shuffle_buffer, max(1, manifest.num_images(split)))
    if label_map is not None and len(label_map) != len(manifest.classes):
        raise ValueError(f"label map of {len(label_map)} entries for {len(manifest.classes)} dataset classes")
    max_boxes = max_boxes or manifest.max_objects(split)
    max_ignore = max_ignore or manifest.max_ignore(split)

    def one_epoch(epoch):
        epoch_seed = tf.cast(base, tf.int64) * 1_000_003 + epoch  # one stateless seed stream per epoch
        records = tf.data.TFRecordDataset(files)
        if training:
            records = records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

        def load(index, serialized):
            size = image_size
            if sizes is not None:  # the same size for the images of one batch
                pick = tf.random.stateless_uniform([], tf.stack([epoch_seed, -1 - index // batch_size]),
                                                   0, len(sizes), dtype=tf.int32)
                size = sizes[pick]
            key = tf.stack([epoch_seed, index])
            return load_example(parse_example(serialized), key, size, letterbox, augment, max_boxes, max_ignore)

        images = records.enumerate().map(load, num_parallel_calls=calls, deterministic=True)
        return images.batch(batch_size, drop_remainder=training if drop_remainder is None else drop_remainder)

    last = 2**62 if repeat else start_epoch + 1
    dataset = tf.data.Dataset.range(start_epoch, last).flat_map(one_epoch)

    def finish(images, targets):
        if not with_meta:
            targets = {k: targets[k] for k in ("boxes", "labels", "ignore")}
        if label_map is not None:
            labels = targets["labels"]
            mapped = tf.gather(tf.constant(list(label_map), tf.int32), tf.maximum(labels, 0))
            targets["labels"] = tf.where(labels >= 0, mapped, -1)
        if encoder is not None:
            targets.update(encoder(targets["boxes"], targets["labels"], tf.shape(images)[1:3], targets["ignore"]))
        return images, targets

    dataset = dataset.map(finish, num_parallel_calls=calls, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(1, os.cpu_count() or 1)
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
