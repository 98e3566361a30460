"""The synthetic shape dataset: determinism, official COCO/KITTI layouts, and labels that match the pixels."""

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_tools import synth

SMALL = dict(num_train=6, num_val=3, size=96, seed=0, progress=False)
SAMPLE = dict(num_train=30, num_val=10, size=128, seed=3, progress=False)
KITTI_3D = [-1.0, -1.0, -1.0, -1000.0, -1000.0, -1000.0, -10.0]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image[..., ::-1]


def _coco(root: Path) -> dict[str, dict]:
    return {split: json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
            for split in ("train", "val")}


def _kitti_labels(root: Path, number: int) -> list[list[str]]:
    return [line.split() for line in (root / "training" / "label_2" / f"{number:06d}.txt").read_text().splitlines()]


def _coco_per_image(document: dict) -> list[tuple[dict, list[dict]]]:
    """(image, its annotations in file order) for every image, in file order."""
    by_image: dict[int, list[dict]] = {image["id"]: [] for image in document["images"]}
    for annotation in document["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    return [(image, by_image[image["id"]]) for image in document["images"]]


def in_both_formats(root: Path, options: dict) -> dict[str, Path]:
    for fmt in synth.FORMATS:
        synth.generate(root / fmt, fmt=fmt, **options)
    return {fmt: root / fmt for fmt in synth.FORMATS}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """The same small dataset (seed 0) in both formats."""
    return in_both_formats(tmp_path_factory.mktemp("synth_small"), SMALL)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, Path]:
    """40 images at size 128 in both formats, for statistics and pixel checks."""
    return in_both_formats(tmp_path_factory.mktemp("synth_sample"), SAMPLE)


@pytest.mark.parametrize("fmt", synth.FORMATS)
def test_same_seed_same_bytes_other_seed_differs(tmp_path, small, fmt):
    synth.generate(tmp_path / "again", fmt=fmt, **SMALL)
    synth.generate(tmp_path / "other", fmt=fmt, **{**SMALL, "seed": 1})
    first, again, other = _files(small[fmt]), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert first == again
    assert not any(name.endswith(".partial") for name in first)
    assert other.keys() == first.keys()
    images = [name for name in first if name.endswith((".jpg", ".png"))]
    assert images and all(other[name] != first[name] for name in images)
    labels = [name for name in first if name.endswith((".json", ".txt"))]
    assert any(other[name] != first[name] for name in labels)


def test_coco_layout(small):
    root = small["coco"]
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        "instances_train2017.json", "instances_val2017.json"]
    documents = _coco(root)
    train_ids = [image["id"] for image in documents["train"]["images"]]
    val_ids = [image["id"] for image in documents["val"]["images"]]
    assert len(train_ids) == 6 and len(val_ids) == 3
    assert not set(train_ids) & set(val_ids)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        names = sorted(p.name for p in (root / f"{split}2017").iterdir())
        assert names == sorted(f"{i:012d}.jpg" for i in ids)


def test_coco_json_structure_and_boxes(small):
    documents = _coco(small["coco"])
    annotation_ids = []
    for split, document in documents.items():
        assert set(document) == {"info", "licenses", "images", "annotations", "categories"}
        assert {"description", "url", "version", "year", "contributor", "date_created"} <= set(document["info"])
        assert all(set(entry) == {"url", "id", "name"} for entry in document["licenses"])
        assert [(c["id"], c["name"], c["supercategory"]) for c in document["categories"]] == [
            (11, "ellipse", "shape"), (13, "triangle", "shape"), (17, "rectangle", "shape"),
            (19, "star", "shape"), (23, "cross", "shape")]
        for image, annotations in _coco_per_image(document):
            assert set(image) == {"id", "file_name", "height", "width", "license", "coco_url",
                                  "flickr_url", "date_captured"}
            decoded = _read_rgb(small["coco"] / f"{split}2017" / image["file_name"])
            assert decoded.shape == (image["height"], image["width"], 3)
            assert max(image["height"], image["width"]) == 96
            assert 0.75 * 96 - 2 <= min(image["height"], image["width"]) and min(decoded.shape[:2]) % 2 == 0
            objects = [a for a in annotations if a["iscrowd"] == 0]
            assert 1 <= len(objects) <= 8
            for annotation in annotations:
                assert set(annotation) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
                assert annotation["category_id"] in synth.CATEGORY_IDS
                x, y, w, h = annotation["bbox"]
                assert all(isinstance(v, float) for v in annotation["bbox"])
                assert 0 <= x and 0 <= y and w > 0 and h > 0
                assert x + w <= image["width"] + 1e-6 and y + h <= image["height"] + 1e-6
                annotation_ids.append(annotation["id"])
            for annotation in objects:
                x, y, w, h = annotation["bbox"]
                # Area of the outline: at most the box, at least a rotated thin star's share.
                assert 0.15 * w * h <= annotation["area"] <= w * h + 1e-6
                (polygon,) = annotation["segmentation"]
                assert len(polygon) >= 6 and len(polygon) % 2 == 0
                points = np.array(polygon).reshape(-1, 2)
                # The box is the tight box of the outline.
                np.testing.assert_allclose([*points.min(axis=0), *points.max(axis=0)], [x, y, x + w, y + h], atol=0.02)
    assert len(annotation_ids) == len(set(annotation_ids))


def test_coco_crowd_regions_are_official_rle(sample):
    crowds = [(image, a) for document in _coco(sample["coco"]).values()
              for image, annotations in _coco_per_image(document) for a in annotations if a["iscrowd"]]
    assert crowds, "40 images should have some ignored regions"
    for image, annotation in crowds:
        rle = annotation["segmentation"]
        assert rle["size"] == [image["height"], image["width"]]
        assert sum(rle["counts"]) == image["height"] * image["width"]
        assert annotation["area"] == sum(rle["counts"][1::2]) > 0


def test_kitti_layout_and_lines(small):
    root = small["kitti"]
    assert sorted(p.name for p in (root / "training").iterdir()) == ["image_2", "label_2"]
    assert sorted(p.name for p in (root / "training" / "image_2").iterdir()) == [f"{i:06d}.png" for i in range(9)]
    assert sorted(p.name for p in (root / "training" / "label_2").iterdir()) == [f"{i:06d}.txt" for i in range(9)]
    for number in range(9):
        height, width = _read_rgb(root / "training" / "image_2" / f"{number:06d}.png").shape[:2]
        lines = _kitti_labels(root, number)
        objects = [fields for fields in lines if fields[0] != "DontCare"]
        assert 1 <= len(objects) <= 8
        # Objects first, DontCare after them, as in KITTI.
        assert lines[:len(objects)] == objects
        for fields in lines:
            assert len(fields) == 15
            kind, truncated, occluded, alpha, *numbers = fields
            left, top, right, bottom, *rest = map(float, numbers)
            assert kind in synth.KITTI_TYPES or kind == "DontCare"
            assert float(alpha) == -10.0 and rest == KITTI_3D
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            if kind == "DontCare":
                assert (float(truncated), int(occluded)) == (-1.0, -1)
            else:
                assert 0.0 <= float(truncated) <= 0.3 and int(occluded) in (0, 1, 2)


def test_kitti_and_coco_hold_the_same_images_and_boxes(small):
    documents = _coco(small["coco"])
    images = _coco_per_image(documents["train"]) + _coco_per_image(documents["val"])
    names = dict(zip(synth.CATEGORY_IDS, synth.KITTI_TYPES))
    for number, (image, annotations) in enumerate(images):
        split = "train" if number < 6 else "val"
        jpeg = _read_rgb(small["coco"] / f"{split}2017" / image["file_name"]).astype(np.float32)
        png = _read_rgb(small["kitti"] / "training" / "image_2" / f"{number:06d}.png").astype(np.float32)
        # JPEG noise and chroma subsampling: compare smoothed pixels.
        difference = cv2.GaussianBlur(jpeg, (7, 7), 0) - cv2.GaussianBlur(png, (7, 7), 0)
        assert jpeg.shape == png.shape and np.abs(difference).mean() < 3
        from_coco = [(names[a["category_id"]] if not a["iscrowd"] else "DontCare",
                      a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                     for a in annotations]
        from_kitti = [(f[0], *map(float, f[4:8])) for f in _kitti_labels(small["kitti"], number)]
        assert [k for k, *_ in from_coco] == [k for k, *_ in from_kitti]
        np.testing.assert_allclose([b for _, *b in from_coco], [b for _, *b in from_kitti], atol=0.011)


def test_files_hold_the_rendered_pixels_in_rgb_order(small):
    """Image i of a split comes from its own generator; PNG is lossless, so bytes match exactly."""
    for number, (split_code, index) in enumerate([(0, i) for i in range(6)] + [(1, i) for i in range(3)]):
        rendered = synth.render_image(np.random.default_rng([0, split_code, index]), 96)
        png = _read_rgb(small["kitti"] / "training" / "image_2" / f"{number:06d}.png")
        np.testing.assert_array_equal(png, rendered.image)
        assert len(rendered.annotations) == len(_kitti_labels(small["kitti"], number))


def test_sample_statistics(sample):
    documents = _coco(sample["coco"])
    images = {image["id"]: image for document in documents.values() for image in document["images"]}
    objects = [a for document in documents.values() for a in document["annotations"] if not a["iscrowd"]]
    counts = Counter(a["image_id"] for a in objects)
    assert set(counts) == set(images) and max(counts.values()) <= 8 and len(set(counts.values())) >= 4
    assert set(Counter(a["category_id"] for a in objects)) == set(synth.CATEGORY_IDS)
    assert {image["height"] > image["width"] for image in images.values()} == {True, False}
    longest = []
    for annotation in objects:
        x, y, w, h = annotation["bbox"]
        image = images[annotation["image_id"]]
        if x > 0.01 and y > 0.01 and x + w < image["width"] - 0.01 and y + h < image["height"] - 0.01:
            longest.append(max(w, h) / 128)
    # The shape's longer side is 5 %-60 % of the image side; rotation turns
    # that into a box side between ~0.7x (a rotated ellipse) and sqrt(2)x.
    assert 0.05 * 0.7 <= min(longest) and max(longest) <= 0.6 * 2**0.5
    assert min(longest) < 0.1 and max(longest) > 0.4  # the whole range is used
    dontcare = sum(fields[0] == "DontCare" for n in range(40) for fields in _kitti_labels(sample["kitti"], n))
    assert dontcare > 0


def test_shapes_are_drawn_where_annotated(sample):
    """Inside each unoccluded outline the pixels are uniform and differ from just outside it."""
    kernel = np.ones((3, 3), np.uint8)
    documents = _coco(sample["coco"])
    images = _coco_per_image(documents["train"]) + _coco_per_image(documents["val"])
    checked = 0
    for number, (image, annotations) in enumerate(images):
        pixels = _read_rgb(sample["kitti"] / "training" / "image_2" / f"{number:06d}.png").astype(np.float32)
        lines = [f for f in _kitti_labels(sample["kitti"], number) if f[0] != "DontCare"]
        for annotation, fields in zip([a for a in annotations if not a["iscrowd"]], lines, strict=True):
            if int(fields[2]) != 0:
                continue  # partly covered: its interior may hold another shape's colour
            outline = np.array(annotation["segmentation"][0]).reshape(-1, 2)
            mask = np.zeros(pixels.shape[:2], np.uint8)
            cv2.fillPoly(mask, [np.round((outline - 0.5) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
            inside = cv2.erode(mask, kernel, iterations=1).astype(bool)
            around = (cv2.dilate(mask, kernel, iterations=3) - cv2.dilate(mask, kernel, iterations=1)).astype(bool)
            if inside.sum() < 10 or around.sum() < 10:
                continue
            colour = np.median(pixels[inside], axis=0)
            spread = np.percentile(np.linalg.norm(pixels[inside] - colour, axis=1), 75)
            contrast = np.linalg.norm(colour - np.median(pixels[around], axis=0))
            assert spread < 30 and contrast > 40, (number, annotation["id"], spread, contrast)
            checked += 1
    assert checked >= 50


def test_rendered_objects_follow_the_occlusion_and_truncation_rules():
    for index in range(40):
        rendered = synth.render_image(np.random.default_rng([7, 0, index]), 128)
        assert 1 <= len(rendered.objects) <= 8
        for annotation in rendered.objects:
            assert annotation.covered <= 1 - synth.MIN_VISIBLE + 1e-9
            assert annotation.truncation <= synth.MAX_TRUNCATION + 1e-9 and annotation.mask is None
        for annotation in rendered.ignored:
            assert annotation.mask.shape == rendered.image.shape[:2] and annotation.mask.any()


def test_summary_matches_the_files(small, tmp_path, capsys):
    summary = synth.generate(tmp_path, fmt="coco", **{**SMALL, "progress": True})
    assert "synth coco" in capsys.readouterr().err  # the progress bar
    assert summary["path"] == str(tmp_path) and summary["format"] == "coco"
    documents = _coco(tmp_path)
    for split, document in documents.items():
        part = summary["splits"][split]
        objects = [a for a in document["annotations"] if not a["iscrowd"]]
        assert part["images"] == len(document["images"])
        assert part["objects"] == len(objects) == sum(part["per_class"].values())
        assert part["ignored"] == len(document["annotations"]) - len(objects)
        by_name = Counter(synth.CLASSES[synth.CATEGORY_IDS.index(a["category_id"])] for a in objects)
        assert part["per_class"] == {name: by_name[name] for name in synth.CLASSES}
    synth.generate(tmp_path / "quiet", fmt="kitti", **SMALL)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "change, name",
    [
        ({"num_train": 0}, "num_train"),
        ({"num_val": 0}, "num_val"),
        ({"num_train": 2.5}, "num_train"),
        ({"size": 31}, "size"),
        ({"size": True}, "size"),
        ({"seed": -1}, "seed"),
        ({"fmt": "voc"}, "fmt"),
    ],
)
def test_invalid_arguments(tmp_path, change, name):
    with pytest.raises(ValueError, match=rf"^{name}=") as error:
        synth.generate(tmp_path / "out", **{**SMALL, **change})
    assert "must be" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_smaller_kitti_run_removes_the_files_numbered_beyond_it(tmp_path):
    synth.generate(tmp_path, num_train=4, num_val=2, size=64, fmt="kitti", progress=False)
    synth.generate(tmp_path, num_train=2, num_val=1, size=64, fmt="kitti", progress=False)
    labels = sorted(p.name for p in (tmp_path / "training" / "label_2").iterdir())
    images = sorted(p.name for p in (tmp_path / "training" / "image_2").iterdir())
    assert labels == ["000000.txt", "000001.txt", "000002.txt"]
    assert images == ["000000.png", "000001.png", "000002.png"]
