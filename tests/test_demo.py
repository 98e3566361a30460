"""`make demo` in small: data conversion, a pipeline batch, and the byte-exact Darknet round trip."""

import json

from kprune import demo


def test_demo_runs_end_to_end(tmp_path):
    summary = demo.run(str(tmp_path), "yolov2-tiny-voc", seed=1, num_train=12, num_val=4)
    assert summary["export_byte_exact"] is True
    data = summary["data"]
    assert data["classes"] == ["ellipse", "triangle", "rectangle", "star", "cross"]
    assert data["images"] == {"train": 12, "val": 4}
    assert data["batch_shape"] == [8, 416, 416, 3]
    # every box of the batch gets an anchor unless two share a cell and anchor (then the later wins)
    assert 0 < data["anchors_assigned"] <= data["boxes_in_batch"]
    assert summary["params"] == 15_867_885
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["data"] == data
    assert (tmp_path / "data" / "dataset.json").is_file() and (tmp_path / "detections.jpg").is_file()
