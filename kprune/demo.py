"""``python -m kprune.demo``: data and the Darknet bridge end to end on built-in data, no download.

Generates the synthetic dataset in the official COCO layout and converts it like real COCO, reads a
training batch with its YOLO targets through the input pipeline, then builds a zoo model with seeded
random weights, writes them as a Darknet .weights file, converts cfg + weights to ``.keras``, exports
the ``.keras`` back and checks the file is byte-for-byte the same, and runs detection on a
validation image.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import time

import numpy as np


def prepare_data(out: str, num_train: int, num_val: int, seed: int) -> dict:
    """Synthetic COCO-layout data in ``out/synth-coco``, converted to ``out/data``; returns the manifest."""
    from data_tools import coco, synth
    from data_tools.convert import write_dataset

    raw = os.path.join(out, "synth-coco")
    synth.generate(raw, num_train=num_train, num_val=num_val, seed=seed, progress=False)
    records, names, nbytes = coco.coco_records(raw, 2017, None)
    return write_dataset(records, names, os.path.join(out, "data"), {"kind": "coco", "dir": raw},
                         {"classes": names}, coco.DROPPED_FIELDS, nbytes, progress=False)


def run(out: str, model_name: str = "yolov2-tiny-voc", seed: int = 0, num_train: int = 64, num_val: int = 16) -> dict:
    """Run the demo into folder ``out`` and return its summary."""
    import cv2

    from kprune.data.pipeline import make_dataset
    from kprune.data.targets import TargetEncoder
    from kprune.darknet.convert import export_darknet, load_darknet
    from kprune.darknet.weights import WeightsHeader, save_weights
    from kprune.models import zoo
    from kprune.models.head import detect
    from kprune.models.inference import coco_results, draw_detections, read_image
    from kprune.fileio import write_json_atomic
    from kprune.models.io import save_model
    from kprune.report.metrics import model_info

    os.makedirs(out, exist_ok=True)
    manifest = prepare_data(out, num_train, num_val, seed)
    classes = manifest["classes"]
    cfg = zoo.cfg_path(model_name)
    model = zoo.build(model_name)
    probe = zoo.build(model_name, classes=len(classes))
    size = probe.input_shape[1]
    dataset = make_dataset(os.path.join(out, "data"), "train", size, 8, training=True,
                           encoder=TargetEncoder.from_model(probe), seed=seed)
    images, targets = next(iter(dataset))
    head = probe.output_names[0]
    rng = np.random.default_rng(seed)
    for weight in model.weights:  # small random weights; positive variances as real batch norm has
        values = rng.normal(0.0, 0.05, weight.shape).astype(np.float32)
        weight.assign(np.abs(values) + 0.5 if "moving_variance" in weight.name else values)
    weights = os.path.join(out, f"{model_name}.weights")
    save_weights(model, weights, WeightsHeader(0, 2, 0, seed))

    start = time.perf_counter()
    converted = load_darknet(cfg, weights)
    convert_seconds = time.perf_counter() - start
    keras_path = os.path.join(out, f"{model_name}.keras")
    save_model(converted, keras_path)
    again = os.path.join(out, f"{model_name}.exported.weights")
    export_darknet(converted, again)
    byte_exact = filecmp.cmp(weights, again, shallow=False)

    val_dir = os.path.join(out, "synth-coco", "val2017")
    image_name = sorted(os.listdir(val_dir))[0]
    image = read_image(os.path.join(val_dir, image_name))
    (detections,) = detect(converted, [image], score_threshold=0.001, iou_threshold=0.45, max_detections=20)
    cv2.imwrite(os.path.join(out, "detections.jpg"), cv2.cvtColor(draw_detections(image, detections), cv2.COLOR_RGB2BGR))
    write_json_atomic(os.path.join(out, "detections.json"), coco_results([detections], [0], [image_name]))

    summary = {
        "data": {
            "classes": classes,
            "images": {split: info["images"] for split, info in manifest["splits"].items()},
            "objects": {split: info["objects"] for split, info in manifest["splits"].items()},
            "batch_shape": list(images.shape),
            "boxes_in_batch": int((targets["labels"].numpy() >= 0).sum()),
            "anchors_assigned": int(targets[head]["mask"].numpy().sum()),
        },
        "model": model_name,
        **model_info(converted),
        "weights_bytes": os.path.getsize(weights),
        "convert_seconds": round(convert_seconds, 3),
        "export_byte_exact": byte_exact,
        "detections": len(detections),
    }
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--model", default="yolov2-tiny-voc", help="zoo model (default: yolov2-tiny-voc)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run(args.out, args.model, args.seed)
    print(json.dumps(summary, indent=1))
    print(f"export byte-exact: {summary['export_byte_exact']}; results in {args.out}")
    return 0 if summary["export_byte_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
