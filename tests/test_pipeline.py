"""The tf.data pipeline: placement identical to inference, boxes that stay on their pixels, seeds."""

import cv2
import numpy as np
import pytest

from data_tools.convert import Record, write_dataset
from kprune._keras import tf
from kprune.data.pipeline import Augment, _clip_boxes, make_dataset, steps_per_epoch
from kprune.detectors.yolo.targets import HeadTarget, TargetEncoder
from kprune.models.head import image_transform, preprocess_image

GREY, RED = (128, 128, 128), (0, 0, 255)  # BGR for cv2
SHAPES = [(48, 64), (100, 30), (64, 64), (75, 120), (40, 90), (90, 60)]
NO_COLOUR = dict(hue=0.0, saturation=(1.0, 1.0), value=(1.0, 1.0))


def rectangles(i: int, h: int, w: int):
    """A red rectangle on a grey image; returns (image, pixel box)."""
    rng = np.random.default_rng(i)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    x1, y1 = int(rng.integers(x0 + w // 4, w + 1)), int(rng.integers(y0 + h // 4, h + 1))
    img = np.full((h, w, 3), GREY, np.uint8)
    img[y0:y1, x0:x1] = RED
    return img, (x0, y0, x1, y1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    records = []
    for i, (h, w) in enumerate(SHAPES * 2):
        img, box = rectangles(i, h * 3, w * 3)  # larger sources, so JPEG blur is under a pixel once resized
        path = root / f"{i}.png"
        cv2.imwrite(str(path), img)
        records.append(Record(path, path.name, str(i), [(box, i % 2)], [((0, 0, 5, 5), "crowd")]))
    write_dataset({"train": records, "val": records[:6]}, ["a", "b"], root / "data", {"kind": "test"}, {},
                  progress=False)
    return root / "data"


def batches(ds, count=None):
    return [(images.numpy(), {k: v for k, v in t.items()}) for images, t in (ds.take(count) if count else ds)]


def test_evaluation_places_images_as_inference_does(dataset):
    images, meta = batches(make_dataset(dataset, "val", 64, 6, with_meta=True))[0]
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.float32
    encoded = list(tf.data.TFRecordDataset(str(dataset / "val-00000-of-00001.tfrecord")))
    from kprune.data.tfrecord import deserialize_sample

    for k, record in enumerate(encoded):
        sample = deserialize_sample(record.numpy())
        pixels = tf.io.decode_jpeg(sample.encoded, channels=3).numpy()
        expected, transform = preprocess_image(pixels, (64, 64))
        assert np.abs(images[k] - expected).max() < 2.5 / 255
        assert transform == image_transform(pixels.shape[:2], (64, 64))
        assert meta["image_hw"][k].numpy().tolist() == list(pixels.shape[:2])
        np.testing.assert_allclose(meta["scale_xy"][k].numpy(), transform.scale_xy, rtol=1e-6)
        np.testing.assert_allclose(meta["offset_xy"][k].numpy(), transform.offset_xy)
        # boxes in the input map back to the stored boxes through the transform
        back = transform.to_image(meta["boxes"][k, :1].numpy())
        stored = sample.boxes * np.array([sample.width, sample.height] * 2)
        np.testing.assert_allclose(back, stored, atol=1e-3)
        assert meta["labels"][k].numpy().tolist() == [k % 2]  # padded to the most boxes of any image: 1
        assert meta["source_id"][k].numpy().decode() == sample.source_id


def coloured_box(image: np.ndarray):
    """Tight box (x0, y0, x1, y1) of the saturated pixels, in pixels, or None."""
    spread = image.max(axis=-1) - image.min(axis=-1)
    ys, xs = np.nonzero(spread > 0.3)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def test_augmentation_keeps_boxes_on_the_pixels_they_label(dataset):
    checked = 0
    for images, targets in batches(make_dataset(dataset, "train", 128, 4, training=True, seed=7, repeat=True), 12):
        for image, boxes, labels in zip(images, targets["boxes"].numpy(), targets["labels"].numpy()):
            pixels = coloured_box(image)
            if labels[0] < 0:  # dropped: almost nothing of it may be left in the image
                assert pixels is None or np.prod(pixels[2:] - pixels[:2]) < 0.3 * 128 * 128
                continue
            assert len(labels) == 1  # padded to the most boxes of any image
            np.testing.assert_allclose(boxes[0] * 128, pixels, atol=2.0)
            checked += 1
    assert checked >= 36  # most of the 48 augmented rectangles survive


def test_flip_alone_mirrors_image_and_boxes_exactly(dataset):
    plain = Augment(flip=0.0, scale=(1, 1), aspect=(1, 1), translate=0.0, **NO_COLOUR)
    flip = Augment(flip=1.0, scale=(1, 1), aspect=(1, 1), translate=0.0, **NO_COLOUR)
    a = batches(make_dataset(dataset, "train", 64, 12, training=True, augment=plain, seed=1))[0]
    b = batches(make_dataset(dataset, "train", 64, 12, training=True, augment=flip, seed=1))[0]
    np.testing.assert_array_equal(b[0], a[0][:, :, ::-1])
    boxes_a, boxes_b = a[1]["boxes"].numpy()[:, 0], b[1]["boxes"].numpy()[:, 0]
    np.testing.assert_allclose(boxes_b, np.stack([1 - boxes_a[:, 2], boxes_a[:, 1], 1 - boxes_a[:, 0], boxes_a[:, 3]], -1),
                               atol=1e-6)


def test_hsv_jitter_changes_colour_only(dataset):
    still = Augment(flip=0.0, scale=(1, 1), aspect=(1, 1), translate=0.0, **NO_COLOUR)
    colour = Augment(flip=0.0, scale=(1, 1), aspect=(1, 1), translate=0.0, hue=0.1)
    a = batches(make_dataset(dataset, "train", 64, 12, training=True, augment=still, seed=2))[0]
    b = batches(make_dataset(dataset, "train", 64, 12, training=True, augment=colour, seed=2))[0]
    np.testing.assert_array_equal(a[1]["boxes"].numpy(), b[1]["boxes"].numpy())
    assert np.abs(a[0] - b[0]).max() > 0.05
    # grey stays grey (saturation 0); only its value may change
    grey = b[0][:, 0, 0]
    np.testing.assert_allclose(grey.max(-1) - grey.min(-1), 0, atol=1e-5)


def test_same_seed_same_stream_each_epoch_differs_and_resuming_replays_the_epoch(dataset):
    steps = steps_per_epoch(dataset, "train", 4)
    assert steps == 3  # 12 images

    def epochs(seed, start=0, count=2):
        ds = make_dataset(dataset, "train", 64, 4, training=True, seed=seed, start_epoch=start, repeat=True)
        images = np.concatenate([b[0] for b in batches(ds, steps * count)])
        return np.split(images, count)

    first, second, other = epochs(11), epochs(11), epochs(12)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], other[0])
    np.testing.assert_array_equal(epochs(11, start=1, count=1)[0], first[1])


def test_multiscale_batches_get_multiples_of_32_and_matching_grids(dataset):
    encoder = TargetEncoder([HeadTarget("region", 32, [0, 1])], [(20, 20), (60, 40)])
    ds = make_dataset(dataset, "train", 96, 2, training=True, multiscale=(64, 160), encoder=encoder, seed=3,
                      repeat=True)
    sizes = set()
    for images, targets in batches(ds, 24):
        size = images.shape[1]
        assert images.shape[2] == size and size % 32 == 0 and 64 <= size <= 160
        assert targets["region"]["mask"].shape == (2, size // 32, size // 32, 2, 1)
        valid = (targets["labels"].numpy() >= 0).sum()
        assert targets["region"]["mask"].numpy().sum() == valid  # one box per image: no collisions
        sizes.add(size)
    assert len(sizes) >= 3


def test_clip_and_drop_rules():
    boxes = tf.constant([[-0.1, 0.2, 0.3, 0.4], [0.95, 0.5, 1.2, 0.6], [0.5, 0.5, 0.505, 0.6], [0.2, 0.2, 0.4, 0.4]])
    clipped, keep = _clip_boxes(boxes, 128, min_size=2.0, min_visible=0.25)
    # 75 % visible: kept and clipped; 20 % visible: dropped; 0.64 px wide: dropped; untouched: kept
    assert keep.numpy().tolist() == [True, False, False, True]
    np.testing.assert_allclose(clipped.numpy()[0], [0.0, 0.2, 0.3, 0.4])


def test_bad_arguments_are_refused(dataset):
    with pytest.raises(ValueError, match="image size 16: must be a whole number of pixels, at least 32"):
        make_dataset(dataset, "train", 16, 2)
    with pytest.raises(ValueError, match=r"multi-scale range \(64, 100\): sizes go in steps of 32"):
        make_dataset(dataset, "train", 64, 2, training=True, multiscale=(64, 100))
    with pytest.raises(ValueError, match=r"multi-scale range \(160, 64\)"):
        make_dataset(dataset, "train", 96, 2, training=True, multiscale=(160, 64))
    with pytest.raises(ValueError, match="no split 'test'"):
        make_dataset(dataset, "test", 96, 2)
    with pytest.raises(ValueError, match="batch size 0"):
        make_dataset(dataset, "train", 96, 0)
    with pytest.raises(ValueError, match="label map of 3 entries for 2 dataset classes"):
        make_dataset(dataset, "val", 64, 2, label_map=[0, 1, 2])
    with pytest.raises(ValueError, match=r"Augment.scale = \(1.2, 0.8\)"):
        Augment(scale=(1.2, 0.8))


def test_label_map_moves_dataset_labels_to_model_labels(dataset):
    plain = batches(make_dataset(dataset, "val", 64, 6))[0][1]["labels"].numpy()
    mapped = batches(make_dataset(dataset, "val", 64, 6, label_map=[7, 3]))[0][1]["labels"].numpy()
    assert plain[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert mapped[:, 0].tolist() == [7, 3, 7, 3, 7, 3]
