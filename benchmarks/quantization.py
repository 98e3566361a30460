"""Float against int8 mAP of one trained detector: post-training quantization (per-channel,
per-tensor, with bias correction and cross-layer equalisation) and quantization-aware training,
beside the float model fine-tuned as long as the QAT runs.

    python benchmarks/quantization.py --model runs/synth-baseline/final.keras --data data/synth \\
        --training runs/synth-baseline/config.yaml --qat-epochs 1,2 --out runs/quantization.json

Writes the rows of :func:`kprune.export.ptq.quantization_rows` (mAP@0.5 on ``val``, the int8 files
run in LiteRT) with the host's matmul GFLOP/s beside the times, as JSON, and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# kprune must come before TensorFlow: kprune._keras sets TF_USE_LEGACY_KERAS.
from kprune.config import read_yaml
from kprune.export.ptq import quantization_rows
from kprune.export.qat import qat_options
from kprune.fileio import json_safe, write_json_atomic
from kprune.models.io import load_model


def table(rows) -> str:
    lines = ["| variant | mAP@0.5 | COCO mAP | .tflite MB | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['bytes'] / 1e6:.2f}" if r.get("bytes") else "-"
        seconds = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        lines.append(f"| {r['label']} | {r['map50']:.4f} | {r['coco_map']:.4f} | {size} | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/synth-baseline/final.keras")
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--training", default="runs/synth-baseline/config.yaml",
                        help="the model's training config: QAT and the controls take its batch, loss and augmentation")
    parser.add_argument("--qat-epochs", default="1,2", help="comma-separated QAT lengths (empty: none)")
    parser.add_argument("--qat-lr", type=float, default=None)
    parser.add_argument("--run-dir", default="runs/quantization")
    parser.add_argument("--out", default="runs/quantization.json")
    parser.add_argument("--no-controls", action="store_true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py beside this file: the matmul peak
    import run as bench

    peak = bench._matmul_peak(5)["gflops_best"]
    epochs = [int(e) for e in args.qat_epochs.split(",") if e.strip()]
    options = qat_options(read_yaml(args.training) if args.training else None, lr=args.qat_lr)
    model = load_model(args.model)
    began = time.perf_counter()
    rows = quantization_rows(model, args.data, qat_epochs=epochs, qat_options=options, run_dir=args.run_dir,
                             controls=not args.no_controls,
                             log=lambda r: print(f"{r['label']}: mAP@0.5 {r['map50']:.4f}", flush=True))
    result = {"model": args.model, "data": args.data, "qat_options": options, "matmul_gflops": peak,
              "seconds": time.perf_counter() - began, "rows": rows}
    write_json_atomic(args.out, json_safe(result))
    print(table(rows))
    print(f"host matmul {peak:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
