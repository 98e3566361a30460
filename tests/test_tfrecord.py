"""The TFRecord format: exact round trips, Object Detection API keys, shards and the manifest."""

import json

import numpy as np
import pytest

from kprune._keras import tf
from kprune.data import tfrecord
from kprune.data.tfrecord import Sample


def make_sample(objects: int = 3, ignore: int = 1) -> Sample:
    rng = np.random.default_rng(objects)
    corner = rng.uniform(0, 0.5, (objects, 2)).astype(np.float32)
    boxes = np.concatenate([corner, corner + rng.uniform(0.01, 0.5, (objects, 2)).astype(np.float32)], axis=1)
    return Sample(
        filename="dir/ïmage 01.jpg",
        source_id="123456",
        encoded=bytes(range(256)) * 3,
        height=375,
        width=1242,
        boxes=boxes,
        labels=np.arange(objects, dtype=np.int64) % 5,
        texts=[f"class{i % 5}" for i in range(objects)],
        ignore=np.tile(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32), (ignore, 1)),
        ignore_texts=["DontCare"] * ignore,
    )


def assert_same(a: Sample, b: Sample) -> None:
    assert (a.filename, a.source_id, a.encoded, a.height, a.width) == (b.filename, b.source_id, b.encoded, b.height, b.width)
    assert a.boxes.dtype == b.boxes.dtype == np.float32 and np.array_equal(a.boxes, b.boxes)
    assert np.array_equal(a.labels, b.labels) and a.texts == b.texts
    assert np.array_equal(a.ignore.reshape(-1, 4), b.ignore) and a.ignore_texts == b.ignore_texts


@pytest.mark.parametrize("objects,ignore", [(3, 1), (0, 0), (7, 0), (0, 2)])
def test_round_trip_is_exact(objects, ignore):
    sample = make_sample(objects, ignore)
    assert_same(sample, tfrecord.deserialize_sample(tfrecord.serialize_sample(sample)))


def test_tensorflow_parse_gives_the_same_values():
    sample = make_sample(4, 2)
    parsed = tfrecord.parse_example(tf.constant(tfrecord.serialize_sample(sample)))
    assert parsed["encoded"].numpy() == sample.encoded
    assert (parsed["height"].numpy(), parsed["width"].numpy()) == (375, 1242)
    assert np.array_equal(parsed["boxes"].numpy(), sample.boxes)
    assert parsed["labels"].numpy().tolist() == sample.labels.tolist()
    assert np.array_equal(parsed["ignore"].numpy(), sample.ignore)
    empty = tfrecord.parse_example(tf.constant(tfrecord.serialize_sample(make_sample(0, 0))))
    assert empty["boxes"].shape == (0, 4) and empty["ignore"].shape == (0, 4)


def test_object_detection_api_keys_and_ignore_kept_apart():
    example = tf.train.Example.FromString(tfrecord.serialize_sample(make_sample(2, 1)))
    keys = set(example.features.feature)
    od_api = {
        "image/height", "image/width", "image/filename", "image/source_id", "image/key/sha256", "image/encoded",
        "image/format", "image/object/bbox/xmin", "image/object/bbox/ymin", "image/object/bbox/xmax",
        "image/object/bbox/ymax", "image/object/class/label", "image/object/class/text",
    }
    assert od_api <= keys
    assert len(example.features.feature["image/object/bbox/xmin"].float_list.value) == 2
    assert len(example.features.feature["image/ignore/bbox/xmin"].float_list.value) == 1


def test_mismatched_lengths_are_refused():
    sample = make_sample(3, 1)
    sample.texts = sample.texts[:2]
    with pytest.raises(ValueError, match="3 boxes, 3 labels and 2 texts"):
        tfrecord.serialize_sample(sample)


def test_shards_round_robin_and_final_names_only_on_commit(tmp_path):
    with tfrecord.ShardWriter(tmp_path, "train", 3) as writer:
        for i in range(7):
            writer.write(tfrecord.serialize_sample(make_sample(i % 3, 0)))
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".train-00000-of-00003.tfrecord.partial", ".train-00001-of-00003.tfrecord.partial",
            ".train-00002-of-00003.tfrecord.partial"]
        names = writer.commit()
    assert names == ["train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord", "train-00002-of-00003.tfrecord"]
    assert writer.counts == [3, 2, 2]
    assert [sum(1 for _ in tf.data.TFRecordDataset(str(tmp_path / n))) for n in names] == [3, 2, 2]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with tfrecord.ShardWriter(tmp_path, "val", 2) as writer:
            writer.write(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_stale_shards_and_partials_are_removed(tmp_path):
    for name in ["train-00000-of-00002.tfrecord", ".train-00000-of-00001.tfrecord.partial",
                 "train-00000-of-00001.tfrecord", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert tfrecord.remove_partial_files(tmp_path) == [".train-00000-of-00001.tfrecord.partial"]
    assert tfrecord.remove_stale_shards(tmp_path, keep=["train-00000-of-00001.tfrecord"]) == [
        "train-00000-of-00002.tfrecord"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "train-00000-of-00001.tfrecord"]


def test_manifest_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="dataset.json not found: .* is not a converted dataset"):
        tfrecord.read_manifest(tmp_path)
    (tmp_path / "dataset.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        tfrecord.read_manifest(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a kprune dataset manifest"):
        tfrecord.read_manifest(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": tfrecord.FORMAT, "version": 1}))
    with pytest.raises(ValueError, match="manifest version 1, this kprune reads version 2"):
        tfrecord.read_manifest(tmp_path)  # version 1 stored 0-based labels: re-convert
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"format": tfrecord.FORMAT, "version": 2, "classes": ["a"], "splits": {"train": {"files": ["t.tfrecord"], "images": 1}}}))
    manifest = tfrecord.read_manifest(tmp_path)
    with pytest.raises(ValueError, match="no split 'val'; splits: train"):
        manifest.files("val")
    with pytest.raises(ValueError, match="shard .*t.tfrecord of split 'train' is missing"):
        manifest.files("train")
