"""Converters on small fixtures built here: exact counts, boxes, stripped bytes and error messages."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from data_tools import coco, kitti, voc
from data_tools.cli import main as data_cli
from data_tools.convert import write_dataset
from jpeg_fixtures import jpeg_with_metadata
from kprune.data import tfrecord

CLASSES = ["horse", "bear", "zebra", "cow", "giraffe"]
CATEGORIES = {"person": 1, "dog": 18, "horse": 19, "sheep": 20, "cow": 21, "elephant": 22, "bear": 23,
              "zebra": 24, "giraffe": 25}


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def jpeg(h: int, w: int, seed: int) -> bytes:
    return cv2.imencode(".jpg", image(h, w, seed))[1].tobytes()


def ann(i, image_id, category, bbox, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": CATEGORIES[category], "bbox": bbox, "iscrowd": crowd,
            "area": bbox[2] * bbox[3], "segmentation": [[0, 0, 1, 0, 1, 1]]}


def make_coco(root: Path, bad_name: str | None = None) -> dict:
    """A COCO-layout fixture; returns the bytes of interest."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "val2017").mkdir()
    with_meta, without_meta = jpeg_with_metadata(image(48, 64, 1))
    files = {
        "train2017/1.jpg": with_meta,
        "train2017/2.png": cv2.imencode(".png", image(40, 40, 2))[1].tobytes(),
        "train2017/3.jpg": jpeg(48, 48, 3),
        "train2017/4.jpg": jpeg(48, 48, 4)[:300],  # truncated
        "train2017/5.jpg": jpeg(48, 48, 5),
        "val2017/10.jpg": jpeg(30, 50, 10),
        "val2017/11.jpg": jpeg(30, 50, 11),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    extra = {"license": 1, "coco_url": "http://x", "flickr_url": "http://y", "date_captured": "2013-11-14"}
    train_images = [{"id": i, "file_name": f, "height": h, "width": w, **extra} for i, f, h, w in [
        (1, "1.jpg", 48, 64), (2, "2.png", 40, 40), (3, "3.jpg", 48, 48), (4, "4.jpg", 48, 48), (5, "5.jpg", 48, 48),
        (6, bad_name or "6.jpg", 48, 48)]]
    train_anns = [
        ann(1, 1, "horse", [4, 4, 20, 16]), ann(2, 1, "person", [30, 10, 10, 10]),
        ann(3, 1, "zebra", [0, 0, 30, 30], crowd=1),
        ann(4, 2, "giraffe", [10, 10, 20, 20]), ann(5, 2, "bear", [30, 30, 20, 20]),  # the bear is clipped
        ann(6, 3, "person", [1, 1, 5, 5]),
        ann(7, 4, "cow", [1, 1, 5, 5]),
        ann(8, 5, "cow", [5, 5, 0, 10]), ann(9, 5, "zebra", [60, 0, 10, 10]), ann(10, 5, "cow", [2, 3, 10, 12]),
        ann(11, 6, "horse", [1, 1, 5, 5]),  # image file missing
    ]
    val_images = [{"id": 10, "file_name": "10.jpg", "height": 30, "width": 50, **extra},
                  {"id": 11, "file_name": "11.jpg", "height": 30, "width": 50, **extra}]
    val_anns = [ann(20, 10, "horse", [0, 0, 25, 30]), ann(21, 10, "cow", [25, 0, 25, 30]), ann(22, 11, "dog", [1, 1, 4, 4])]
    categories = [{"supercategory": "animal", "id": i, "name": n} for n, i in CATEGORIES.items()]
    for split, images, anns in (("train", train_images, train_anns), ("val", val_images, val_anns)):
        payload = {"info": {"year": 2017}, "licenses": [{"id": 1, "name": "x", "url": "y"}], "images": images,
                   "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))
    return {"with_meta": with_meta, "without_meta": without_meta}


def convert_coco(src: Path, out: Path, **kwargs):
    records, names, nbytes = coco.coco_records(src, 2017, kwargs.pop("classes", CLASSES), kwargs.pop("keep_negatives", 0))
    return write_dataset(records, names, out, {"kind": "coco"}, {}, coco.DROPPED_FIELDS,
                         nbytes, progress=False, **kwargs)


def read_split(out: Path, split: str):
    manifest = tfrecord.read_manifest(out)
    samples = []
    for path in manifest.files(split):
        samples += [tfrecord.deserialize_sample(r.numpy()) for r in tfrecord.tf.data.TFRecordDataset(path)]
    return {s.source_id: s for s in samples}


def test_coco_subset_counts_boxes_and_stripped_bytes(tmp_path):
    fixture = make_coco(tmp_path / "coco")
    manifest = convert_coco(tmp_path / "coco", tmp_path / "out")
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["classes"] == CLASSES
    assert (train["images"], train["objects"], train["ignore_regions"], train["negatives"]) == (3, 4, 1, 0)
    assert train["objects_per_class"] == {"horse": 1, "bear": 1, "zebra": 0, "cow": 1, "giraffe": 1}
    assert (train["boxes_clipped"], train["boxes_dropped"]) == (1, 2)
    assert sorted(s["file"] for s in train["skipped"]) == ["4.jpg", "6.jpg"]
    reasons = {s["file"]: s["reason"] for s in train["skipped"]}
    assert "truncated" in reasons["4.jpg"] and reasons["6.jpg"] == "image file missing"
    assert (val["images"], val["objects_per_class"]["horse"], val["objects_per_class"]["cow"]) == (1, 1, 1)

    samples = read_split(tmp_path / "out", "train")
    assert sorted(samples) == ["1", "2", "5"]
    first = samples["1"]
    assert first.encoded == fixture["without_meta"]  # EXIF/XMP/ICC/COM gone, not re-encoded
    assert b"Exif" not in first.encoded and (first.height, first.width) == (48, 64)
    np.testing.assert_allclose(first.boxes, [[4 / 64, 4 / 48, 24 / 64, 20 / 48]], rtol=1e-6)
    assert first.labels.tolist() == [0] and first.texts == ["horse"]
    np.testing.assert_allclose(first.ignore, [[0, 0, 30 / 64, 30 / 48]], rtol=1e-6)
    assert first.ignore_texts == ["crowd"]
    png = samples["2"]
    assert png.encoded[:2] == b"\xff\xd8" and png.labels.tolist() == [4, 1]
    np.testing.assert_allclose(png.boxes[1], [30 / 40, 30 / 40, 1.0, 1.0], rtol=1e-6)  # clipped bear
    assert samples["5"].labels.tolist() == [3]

    saved = len(fixture["with_meta"]) - len(fixture["without_meta"])
    assert train["bytes"]["metadata_removed"] == saved > 500
    assert train["bytes"]["reencoded_images"] == 1
    assert manifest["bytes"]["metadata_removed"] == saved
    assert "annotations.segmentation" in manifest["dropped_fields"]


def test_coco_keep_negatives(tmp_path):
    make_coco(tmp_path / "coco")
    manifest = convert_coco(tmp_path / "coco", tmp_path / "out", keep_negatives=1)
    assert manifest["splits"]["train"]["images"] == 4 and manifest["splits"]["train"]["negatives"] == 1
    assert manifest["splits"]["val"]["negatives"] == 1
    assert len(read_split(tmp_path / "out", "train")["3"].labels) == 0
    # --classes all: every category, in id order
    assert coco.coco_records(tmp_path / "coco", 2017, None)[1] == [
        "person", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"]


def test_coco_bad_input_messages(tmp_path):
    make_coco(tmp_path / "coco")
    with pytest.raises(ValueError, match="no class named 'unicorn'; classes that exist: bear, cow, dog, elephant"):
        coco.coco_records(tmp_path / "coco", 2017, ["horse", "unicorn"])
    with pytest.raises(ValueError, match=r"missing COCO annotation file .*expected .*instances_train2014.json"):
        coco.coco_records(tmp_path / "coco", 2014, CLASSES)
    with pytest.raises(ValueError, match="split 'train' has no images with objects of the classes sheep"):
        convert_coco(tmp_path / "coco", tmp_path / "out", classes=["sheep"])
    assert not (tmp_path / "out" / "dataset.json").exists()
    for bad in ("../escape.jpg", "/etc/passwd"):
        (tmp_path / "bad").exists() and __import__("shutil").rmtree(tmp_path / "bad")
        make_coco(tmp_path / "bad", bad_name=bad)
        with pytest.raises(ValueError, match="image file name .* is rejected"):
            coco.coco_records(tmp_path / "bad", 2017, CLASSES)


def test_killed_conversion_leaves_no_shard_and_keeps_the_previous_dataset(tmp_path, monkeypatch):
    make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    convert_coco(tmp_path / "coco", out, images_per_shard=2)  # 3 train shards (5 records), 1 val shard
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["dataset.json", "train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord",
                              "train-00002-of-00003.tfrecord", "val-00000-of-00001.tfrecord"]
    real = tfrecord.serialize_sample
    calls = []

    def dies_on_the_third(sample):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(sample)

    monkeypatch.setattr(tfrecord, "serialize_sample", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        convert_coco(tmp_path / "coco", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old dataset intact, no partials
    (out / ".train-00000-of-00001.tfrecord.partial").write_bytes(b"left by a kill -9")
    monkeypatch.setattr(tfrecord, "serialize_sample", real)
    manifest = convert_coco(tmp_path / "coco", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json", "train-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord"]
    assert manifest["splits"]["train"]["images"] == 3 and sorted(read_split(out, "train")) == ["1", "2", "5"]


def test_killed_while_renaming_leaves_no_manifest_then_a_rerun_completes(tmp_path, monkeypatch):
    make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    convert_coco(tmp_path / "coco", out)
    real_replace = tfrecord.os.replace
    renames = []

    def dies_on_the_second_rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(tfrecord.os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        convert_coco(tmp_path / "coco", out, classes=["cow", "giraffe", "bear"])
    monkeypatch.setattr(tfrecord.os, "replace", real_replace)
    # the first shard was renamed over the old one: the old manifest must not describe it
    with pytest.raises(ValueError, match="dataset.json not found"):
        tfrecord.read_manifest(out)
    manifest = convert_coco(tmp_path / "coco", out, classes=["cow", "giraffe", "bear"])
    assert manifest["classes"] == ["cow", "giraffe", "bear"] and manifest["label_offset"] == 1
    assert read_split(out, "train")["2"].labels.tolist() == [1, 2]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]


def test_labels_are_stored_one_based_as_the_object_detection_api_wants(tmp_path):
    make_coco(tmp_path / "coco")
    convert_coco(tmp_path / "coco", tmp_path / "out")
    record = next(iter(tfrecord.tf.data.TFRecordDataset(str(tmp_path / "out" / "train-00000-of-00001.tfrecord"))))
    example = tfrecord.tf.train.Example.FromString(record.numpy())
    assert list(example.features.feature["image/object/class/label"].int64_list.value) == [1]  # horse, label 0
    assert list(example.features.feature["image/object/class/text"].bytes_list.value) == [b"horse"]


def test_more_bad_input(tmp_path):
    make_coco(tmp_path / "coco")
    with pytest.raises(ValueError, match="split 'train' has no objects of the classes sheep"):
        convert_coco(tmp_path / "coco", tmp_path / "out", classes=["sheep"], keep_negatives=2)
    path = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    del data["annotations"][1]["bbox"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_val2017.json: annotation 21 is malformed \(missing key 'bbox'\)"):
        coco.coco_records(tmp_path / "coco", 2017, CLASSES)
    (tmp_path / "coco" / "train2017" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    data["annotations"][1]["bbox"] = [0, 0, 5, 5]
    path.write_text(json.dumps(data))
    manifest = convert_coco(tmp_path / "coco", tmp_path / "out")
    reasons = {s["file"]: s["reason"] for s in manifest["splits"]["train"]["skipped"]}
    assert reasons["2.png"].startswith("cannot be decoded")
    make_kitti(tmp_path / "kitti")
    with pytest.raises(ValueError, match="DontCare cannot be a class"):
        kitti.kitti_records(tmp_path / "kitti", ["Car", "DontCare"], {})
    with pytest.raises(ValueError, match="not both"):
        kitti.kitti_records(tmp_path / "kitti", ["Car"], {}, val_fraction=0.3, train=3, val=2)


def test_cli_coco_summary_and_one_line_errors(tmp_path):
    make_coco(tmp_path / "coco")
    runner = CliRunner()
    result = runner.invoke(data_cli, ["coco", "--coco-dir", str(tmp_path / "coco"), "--out", str(tmp_path / "out"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert "images                    3            1" in result.output
    assert "skipped (train) 4.jpg: truncated" in result.output
    result = runner.invoke(data_cli, ["coco", "--coco-dir", str(tmp_path / "coco"), "--out", str(tmp_path / "o2"),
                                      "--classes", "horse,yeti"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "'yeti'" in result.output and result.output.count("\n") == 1
    for command in ("coco", "kitti", "voc", "synth"):
        help_text = runner.invoke(data_cli, [command, "--help"]).output
        assert "--out" in help_text


KITTI_LINE = "{} 0.00 0 -10 {} {} {} {} -1 -1 -1 -1000 -1000 -1000 -10"


def make_kitti(root: Path, extra_line: str | None = None) -> None:
    images, labels = root / "training" / "image_2", root / "training" / "label_2"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    content = {
        "000000": [("Car", 1, 2, 30, 20), ("DontCare", 40, 5, 60, 25), ("Person_sitting", 70, 1, 80, 29)],
        "000001": [("Van", 0, 0, 50, 30), ("Tram", 1, 1, 5, 5), ("Misc", 2, 2, 6, 6)],
        "000002": [("Pedestrian", 10, 5, 20, 29), ("Cyclist", 90, 10, 120, 28)],  # the cyclist is clipped
        "000003": [("Truck", 5, 5, 50, 25)],
        "000004": [],
        "000005": [("Car", 3, 3, 9, 9)],
    }
    for i, (stem, objects) in enumerate(content.items()):
        cv2.imwrite(str(images / f"{stem}.png"), image(30, 100, i))
        lines = [KITTI_LINE.format(t, *box) for t, *box in objects]
        if extra_line and stem == "000003":
            lines.append(extra_line)
        (labels / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def test_kitti_dontcare_mapping_and_deterministic_split(tmp_path):
    make_kitti(tmp_path / "kitti")
    classes = list(kitti.DEFAULT_CLASSES)
    mapping = kitti.parse_mapping(["Person_sitting=Pedestrian"], classes)
    records, _, left_out = kitti.kitti_records(tmp_path / "kitti", classes, mapping, train=4, val=2, seed=3)
    assert left_out == {"Misc": 1, "Tram": 1}
    again, _, _ = kitti.kitti_records(tmp_path / "kitti", classes, mapping, train=4, val=2, seed=3)
    split = {k: [r.source_id for r in v] for k, v in records.items()}
    assert split == {k: [r.source_id for r in v] for k, v in again.items()}
    assert sorted(split["train"] + split["val"]) == [f"{i:06d}" for i in range(6)] and len(split["val"]) == 2
    other, _, _ = kitti.kitti_records(tmp_path / "kitti", classes, mapping, train=4, val=2, seed=4)
    fractions, _, _ = kitti.kitti_records(tmp_path / "kitti", classes, mapping, val_fraction=0.5)
    assert (len(fractions["train"]), len(fractions["val"])) == (3, 3)

    manifest = write_dataset(records, classes, tmp_path / "out", {"kind": "kitti"}, {}, progress=False)
    total = {name: sum(s["objects_per_class"][name] for s in manifest["splits"].values()) for name in classes}
    assert total == {"Car": 2, "Van": 1, "Truck": 1, "Pedestrian": 2, "Cyclist": 1}
    assert sum(s["ignore_regions"] for s in manifest["splits"].values()) == 1
    assert sum(s["boxes_clipped"] for s in manifest["splits"].values()) == 1
    samples = {**read_split(tmp_path / "out", "train"), **read_split(tmp_path / "out", "val")}
    first = samples["000000"]
    np.testing.assert_allclose(first.boxes, [[0.01, 2 / 30, 0.30, 20 / 30], [0.70, 1 / 30, 0.80, 29 / 30]], rtol=1e-6)
    assert first.texts == ["Car", "Pedestrian"] and first.ignore_texts == ["DontCare"]
    np.testing.assert_allclose(samples["000002"].boxes[1], [0.9, 10 / 30, 1.0, 28 / 30], rtol=1e-6)


def test_kitti_bad_input_messages(tmp_path):
    make_kitti(tmp_path / "kitti", extra_line="Car 0 0 -10 1 2 3")
    classes = list(kitti.DEFAULT_CLASSES)
    with pytest.raises(ValueError, match=r"000003.txt:2: 7 fields, a KITTI label line has 15"):
        kitti.kitti_records(tmp_path / "kitti", classes, {})
    (tmp_path / "k2").mkdir()
    with pytest.raises(ValueError, match=r"missing KITTI labels .*expected the folder .*training/label_2"):
        kitti.kitti_records(tmp_path / "k2", classes, {})
    make_kitti(tmp_path / "k3")
    with pytest.raises(ValueError, match="no class named 'Bus'; classes that exist: Car, Cyclist, DontCare"):
        kitti.kitti_records(tmp_path / "k3", ["Car", "Bus"], {})
    with pytest.raises(ValueError, match="'Person' is not one of the classes"):
        kitti.parse_mapping(["Person_sitting=Person"], classes)
    with pytest.raises(ValueError, match="more than the 6 labelled images"):
        kitti.kitti_records(tmp_path / "k3", classes, {}, train=5, val=2)


VOC_XML = """<annotation><filename>{id}.jpg</filename><size><width>50</width><height>40</height></size>
{objects}</annotation>"""
VOC_OBJECT = ("<object><name>{}</name><pose>Left</pose><truncated>0</truncated><difficult>{}</difficult>"
              "<bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>")


def test_voc_difficult_objects_become_ignore_regions(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    content = {
        "000005": [("horse", 0, 1, 1, 25, 20), ("person", 1, 30, 5, 45, 35), ("cow", 1, 2, 2, 10, 10)],
        "000007": [("cow", 0, 10, 10, 40, 40)],
        "000009": [("dog", 0, 1, 1, 5, 5)],
    }
    for image_id, objects in content.items():
        xml = VOC_XML.format(id=image_id, objects="".join(VOC_OBJECT.format(*o) for o in objects))
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg(40, 50, int(image_id)))
    (root / "ImageSets/Main/train.txt").write_text("000005\n000009\n")
    (root / "ImageSets/Main/val.txt").write_text("000007\n")
    records, _ = voc.voc_records(tmp_path / "VOCdevkit", 2007, ["horse", "cow"])
    assert [r.source_id for r in records["train"]] == ["000005"]  # 000009 has none of the classes
    first = records["train"][0]
    assert first.objects == [((0.0, 0.0, 25.0, 20.0), 0)]  # 1-based inclusive -> continuous
    assert first.ignore == [((1.0, 1.0, 10.0, 10.0), "difficult")]
    assert records["val"][0].objects == [((9.0, 9.0, 40.0, 40.0), 1)]
    with pytest.raises(ValueError, match="no class named 'yeti'"):
        voc.voc_records(root, 2007, ["yeti"])
    result = CliRunner().invoke(data_cli, ["voc", "--voc-dir", str(tmp_path / "VOCdevkit"), "--classes", "horse,cow",
                                           "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = tfrecord.read_manifest(tmp_path / "out").data
    assert manifest["splits"]["train"]["ignore_regions"] == 1 and manifest["splits"]["val"]["objects"] == 1
    assert "pose" in manifest["dropped_fields"]
    (root / "ImageSets/Main/val.txt").write_text("../../x\n")
    with pytest.raises(ValueError, match="'../../x' is rejected"):
        voc.voc_records(root, 2007, ["horse"])


@pytest.mark.parametrize("fmt", ["coco", "kitti"])
def test_synthetic_data_goes_through_the_real_converters(tmp_path, fmt):
    from data_tools import synth

    runner = CliRunner()
    result = runner.invoke(data_cli, ["synth", "--out", str(tmp_path / "raw"), "--num-train", "8", "--num-val", "4",
                                      "--size", "96", "--format", fmt, "--quiet"])
    assert result.exit_code == 0, result.output
    made = synth.generate(tmp_path / "again", num_train=8, num_val=4, size=96, fmt=fmt, progress=False)
    if fmt == "coco":
        args = ["coco", "--coco-dir", str(tmp_path / "raw"), "--classes", "all"]
    else:
        args = ["kitti", "--kitti-dir", str(tmp_path / "raw"), "--classes", ",".join(synth.KITTI_TYPES),
                "--train", "8", "--val", "4"]
    result = runner.invoke(data_cli, args + ["--out", str(tmp_path / "data"), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = tfrecord.read_manifest(tmp_path / "data")
    splits = manifest.data["splits"]
    assert len(manifest.classes) == 5
    assert sum(s["images"] for s in splits.values()) == 12
    assert sum(s["objects"] for s in splits.values()) == sum(s["objects"] for s in made["splits"].values())
    assert sum(s["ignore_regions"] for s in splits.values()) == sum(s["ignored"] for s in made["splits"].values())
    assert all(not s["skipped"] and s["boxes_dropped"] == 0 for s in splits.values())
    if fmt == "coco":
        assert manifest.classes == list(synth.CLASSES) and splits["train"]["images"] == 8
        assert splits["train"]["objects_per_class"] == made["splits"]["train"]["per_class"]


@pytest.mark.parametrize("kind, expected", [("coco", "annotations/instances_{train,val}2017.json"),
                                            ("kitti", "training/label_2"), ("voc", "ImageSets/Main")])
def test_missing_dataset_folder_names_layout_and_source(tmp_path, kind, expected):
    missing = str(tmp_path / "nowhere")
    result = CliRunner().invoke(data_cli, [kind, f"--{kind}-dir", missing, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{kind} folder '{missing}' not found" in result.output and expected in result.output
    assert "http" in result.output and not (tmp_path / "out").exists()


def make_voc_year(devkit: Path, year: int, content: dict, lists: dict) -> None:
    """VOCdevkit/VOC{year} with one 40x50 JPEG and XML per image and the given ImageSets/Main lists."""
    root = devkit / f"VOC{year}"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for seed, (image_id, objects) in enumerate(content.items(), start=year):
        xml = VOC_XML.format(id=image_id, objects="".join(VOC_OBJECT.format(*o) for o in objects))
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg(40, 50, seed))
    for name, ids in lists.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def make_voc0712(devkit: Path) -> None:
    """Two years; both have an image 000005 (a horse in 2007, a cow in 2012)."""
    make_voc_year(devkit, 2007, {
        "000005": [("horse", 0, 1, 1, 25, 20), ("cow", 1, 2, 2, 10, 10)],
        "000007": [("cow", 0, 10, 10, 40, 40)],
        "000009": [("dog", 0, 1, 1, 5, 5)],
        "000012": [("horse", 0, 5, 5, 20, 20), ("cow", 0, 21, 5, 45, 35), ("horse", 1, 1, 1, 4, 4)],
    }, {"train": ["000005", "000009"], "val": ["000007"], "trainval": ["000005", "000007", "000009"],
        "test": ["000012"]})
    make_voc_year(devkit, 2012, {
        "000005": [("cow", 0, 3, 3, 30, 30)],
        "2008_000001": [("horse", 0, 1, 1, 20, 20), ("horse", 0, 25, 10, 50, 40)],
        "2008_000002": [("cow", 1, 1, 1, 20, 20)],
        "2008_000003": [("cow", 0, 10, 5, 30, 25), ("person", 0, 1, 1, 9, 9)],
    }, {"trainval": ["000005", "2008_000001", "2008_000002", "2008_000003"]})


def convert_voc(devkit: Path, out: Path, *args: str):
    return CliRunner().invoke(data_cli, ["voc", "--voc-dir", str(devkit), "--classes", "horse,cow", "--out", str(out),
                                         "--quiet", *args])


def test_voc_splits_of_several_years_are_concatenated_with_unique_ids(tmp_path):
    make_voc0712(tmp_path / "VOCdevkit")
    result = convert_voc(tmp_path / "VOCdevkit", tmp_path / "voc0712",
                         "--train", "2007:trainval,2012:trainval", "--val", "2007:test")
    assert result.exit_code == 0, result.output
    manifest = tfrecord.read_manifest(tmp_path / "voc0712").data
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    # train: 2007 000005, 000007 (000009 has no horse or cow) + 2012 000005, 2008_000001, 2008_000003
    # (2008_000002 has only a difficult cow)
    assert (train["images"], train["objects"], train["ignore_regions"]) == (5, 6, 1)
    assert train["objects_per_class"] == {"horse": 3, "cow": 3}
    assert (val["images"], val["objects_per_class"], val["ignore_regions"]) == (1, {"horse": 1, "cow": 1}, 1)
    assert manifest["options"] == {"image_sets": {"train": ["2007:trainval", "2012:trainval"], "val": ["2007:test"]},
                                   "ids_prefixed_with_year": True, "classes": ["horse", "cow"]}
    samples = read_split(tmp_path / "voc0712", "train")
    assert sorted(samples) == ["2007_000005", "2007_000007", "2012_000005", "2012_2008_000001", "2012_2008_000003"]
    assert all(s.filename == f"{source_id}.jpg" for source_id, s in samples.items())
    assert samples["2007_000005"].texts == ["horse"] and samples["2012_000005"].texts == ["cow"]
    np.testing.assert_allclose(samples["2012_000005"].boxes, [[2 / 50, 2 / 40, 30 / 50, 30 / 40]], rtol=1e-6)
    assert sorted(read_split(tmp_path / "voc0712", "val")) == ["2007_000012"]

    records, nbytes = voc.image_set_records(tmp_path / "VOCdevkit", {"train": [(2007, "trainval"), (2012, "trainval")],
                                                                     "val": [(2007, "test")]}, ["horse", "cow"])
    assert [r.source_id for r in records["train"]] == ["2007_000005", "2007_000007", "2012_000005",
                                                       "2012_2008_000001", "2012_2008_000003"]
    # every one of the 8 annotation files is listed (and read) once
    assert nbytes == sum(p.stat().st_size for p in (tmp_path / "VOCdevkit").glob("VOC*/Annotations/*.xml"))


def test_voc_year_is_the_short_form_of_train_and_val(tmp_path):
    make_voc0712(tmp_path / "VOCdevkit")
    for out, args in (("year", ["--year", "2007"]), ("default", []),
                      ("sets", ["--train", "2007:train", "--val", "2007:val"])):
        result = convert_voc(tmp_path / "VOCdevkit", tmp_path / out, *args)
        assert result.exit_code == 0, result.output
    short = tfrecord.read_manifest(tmp_path / "year").data
    assert short["options"] == {"year": 2007, "image_sets": {"train": ["2007:train"], "val": ["2007:val"]},
                                "ids_prefixed_with_year": False, "classes": ["horse", "cow"]}
    assert tfrecord.read_manifest(tmp_path / "default").data["options"] == short["options"]
    train = read_split(tmp_path / "year", "train")
    assert sorted(train) == ["000005"] and train["000005"].filename == "000005.jpg"  # VOC ids, as before
    assert sorted(read_split(tmp_path / "year", "val")) == ["000007"]
    assert (short["splits"]["train"]["images"], short["splits"]["train"]["objects"]) == (1, 1)
    for shard in ("train-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord"):
        # compared as messages: protobuf may order the feature map differently from one write to the next
        year, default, sets = ([tfrecord.tf.train.Example.FromString(r.numpy())
                                for r in tfrecord.tf.data.TFRecordDataset(str(tmp_path / out / shard))]
                               for out in ("year", "default", "sets"))
        assert len(year) == 1 and year == default == sets
    assert voc.split_image_sets(2012) == {"train": [(2012, "train")], "val": [(2012, "val")]}


NOT_YEAR_NAME = "is not YEAR:NAME, e.g. 2007:trainval for VOCdevkit/VOC2007/ImageSets/Main/trainval.txt"
BOTH = "give both, e.g. --train 2007:trainval,2012:trainval --val 2007:test"


@pytest.mark.parametrize("args, message", [
    (["--train", "2007", "--val", "2007:test"], f"--train: entry '2007' {NOT_YEAR_NAME}"),
    (["--train", "2007:trainval", "--val", "07:test"], f"--val: entry '07:test' {NOT_YEAR_NAME}"),
    (["--train", "2007:trainval,", "--val", "2007:test"], f"--train: entry '' {NOT_YEAR_NAME}"),
    (["--train", "2007:../../etc", "--val", "2007:test"], f"--train: entry '2007:../../etc' {NOT_YEAR_NAME}"),
    (["--train", "2007:trainval,2007:trainval", "--val", "2007:test"],
     "--train: entry '2007:trainval' is given twice"),
    (["--year", "2007", "--train", "2007:trainval"],
     "--year 2007 is short for --train 2007:train --val 2007:val; give either --year or --train and --val, not both"),
    (["--year", "2012", "--val", "2007:test"],
     "--year 2012 is short for --train 2012:train --val 2012:val; give either --year or --train and --val, not both"),
    (["--train", "2007:trainval"], f"--train is given without --val: {BOTH}"),
    (["--val", "2007:test"], f"--val is given without --train: {BOTH}"),
    (["--train", "2007:trainval,2010:trainval", "--val", "2007:test"],
     "image set '2010:trainval': missing the VOC2010 folder, expected {devkit}/VOC2010 "
     "(VOCdevkit/VOC2010 with Annotations/, JPEGImages/ and ImageSets/Main/)"),
    (["--train", "2012:trainval", "--val", "2012:test"],
     "missing image list of '2012:test': expected {devkit}/VOC2012/ImageSets/Main/test.txt"),
    (["--train", "2007:trainval", "--val", "2007:val"],
     "image 000007 is listed by 2007:trainval (train) and by 2007:val (val): an image may be listed only once, "
     "in one split"),
])
def test_voc_image_set_bad_input_messages(tmp_path, args, message):
    devkit = tmp_path / "VOCdevkit"
    make_voc0712(devkit)
    result = convert_voc(devkit, tmp_path / "out", *args)
    assert result.exit_code == 1
    assert result.output == f"Error: {message.format(devkit=devkit)}\n"
    assert not (tmp_path / "out").exists()


def test_voc_year_folder_as_voc_dir_serves_one_year_only(tmp_path):
    make_voc0712(tmp_path / "VOCdevkit")
    one_year = tmp_path / "VOCdevkit" / "VOC2007"
    result = convert_voc(one_year, tmp_path / "out", "--train", "2007:trainval", "--val", "2007:test")
    assert result.exit_code == 0, result.output
    assert sorted(read_split(tmp_path / "out", "train")) == ["000005", "000007"]
    expected = (f"image set '2007:trainval': --voc-dir {one_year} is one year's folder (it has Annotations/); to "
                "combine the years 2007, 2012 give the VOCdevkit folder that holds VOC2007/, VOC2012/")
    with pytest.raises(ValueError, match=re.escape(expected)):
        voc.image_set_records(one_year, {"train": [(2007, "trainval")], "val": [(2012, "trainval")]}, ["horse"])
    with pytest.raises(ValueError, match="split 'train': image set '2007:a/b' is not YEAR:NAME"):
        voc.image_set_records(tmp_path / "VOCdevkit", {"train": [(2007, "a/b")]}, ["horse"])
