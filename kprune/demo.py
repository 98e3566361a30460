"""``python -m kprune.demo``: the Darknet bridge end to end on built-in data, no download needed.

Builds a zoo model, gives it seeded random weights, writes them as a Darknet .weights file, converts
cfg + weights to ``.keras``, exports the ``.keras`` back and checks the file is byte-for-byte the same,
then runs detection on a generated image and prints the model's figures.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import time

import numpy as np


def _synthetic_image(seed: int, height: int = 240, width: int = 320) -> np.ndarray:
    """A noisy RGB image with a few filled rectangles and ellipses."""
    import cv2

    rng = np.random.default_rng(seed)
    image = (rng.normal(110, 30, (height, width, 3))).clip(0, 255).astype(np.uint8)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        x1, y1 = x0 + int(rng.integers(30, 120)), y0 + int(rng.integers(30, 100))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            cv2.rectangle(image, (x0, y0), (x1, y1), colour, -1)
        else:
            cv2.ellipse(image, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360, colour, -1)
    return image


def run(out: str, model_name: str = "yolov2-tiny-voc", seed: int = 0) -> dict:
    """Run the demo into folder ``out`` and return its summary."""
    import cv2

    from kprune.darknet.convert import export_darknet, load_darknet
    from kprune.darknet.weights import WeightsHeader, save_weights
    from kprune.models import zoo
    from kprune.models.head import detect
    from kprune.models.inference import coco_results, draw_detections
    from kprune.fileio import write_json_atomic
    from kprune.models.io import save_model
    from kprune.report.metrics import model_info

    os.makedirs(out, exist_ok=True)
    cfg = zoo.cfg_path(model_name)
    model = zoo.build(model_name)
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

    image = _synthetic_image(seed)
    (detections,) = detect(converted, [image], score_threshold=0.001, iou_threshold=0.45, max_detections=20)
    cv2.imwrite(os.path.join(out, "detections.jpg"), cv2.cvtColor(draw_detections(image, detections), cv2.COLOR_RGB2BGR))
    write_json_atomic(os.path.join(out, "detections.json"), coco_results([detections], [0], ["synthetic.png"]))

    summary = {
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
