"""A pruned model exported to Darknet runs there with the Keras outputs: a one-off check against a
Darknet build (pjreddie's or AlexeyAB's fork, CPU-only, no OpenCV needed).

    python benchmarks/darknet_roundtrip.py --darknet DARKNET_DIR yolov3-tiny --size 96 --width 0.25

DARKNET_DIR is a built Darknet source tree: ``include/darknet.h`` and ``libdarknet.a`` or
``libdarknet.so`` (pjreddie's ``make`` builds both; the fork needs ``make LIBSO=1``). The script
builds the zoo model at the given size and width with random weights, removes ``--ratio`` of its
filters (L1, uniform), exports the cfg + .weights pair with ``kprune.darknet.convert.export_darknet``,
runs one random image through it in Darknet (a small C program compiled here with gcc against that
build) and prints the largest absolute difference between Darknet's and Keras' raw head outputs
(the outputs of the conv before each [yolo] / [region] layer). It exits with 1 when the difference
exceeds ``--tolerance`` times the largest output (at least 1): float32 sums in another order differ
by about 1e-6 of the values summed. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# kprune must come before TensorFlow: kprune._keras sets TF_USE_LEGACY_KERAS.
from kprune.darknet import zoo
from kprune.darknet.builder import build_model
from kprune.darknet.convert import export_darknet
from kprune.prune.structured import prune_filters

HARNESS = r"""
/* Load a cfg + .weights pair, run one CHW float32 image, write the outputs of the layer before each
   [yolo] / [region] layer (the raw head convs) in layer order as float32. */
#include <stdio.h>
#include <stdlib.h>
#include "darknet.h"

int main(int argc, char **argv)
{
    if (argc != 5) { fprintf(stderr, "usage: %s CFG WEIGHTS IMAGE.f32 OUT.f32\n", argv[0]); return 2; }
#ifdef FORK
    network *net = load_network_custom(argv[1], argv[2], 0, 1);
#else
    network *net = load_network(argv[1], argv[2], 0);
    set_batch_network(net, 1);
#endif
    int n = net->w * net->h * net->c;
    float *input = calloc(n, sizeof(float));
    FILE *f = fopen(argv[3], "rb");
    if (!f || fread(input, sizeof(float), n, f) != (size_t)n) { fprintf(stderr, "cannot read %s\n", argv[3]); return 1; }
    fclose(f);
#ifdef FORK
    network_predict_ptr(net, input);
#else
    network_predict(net, input);
#endif
    FILE *out = fopen(argv[4], "wb");
    for (int i = 1; i < net->n; ++i) {
        if (net->layers[i].type == YOLO || net->layers[i].type == REGION) {
            layer conv = net->layers[i - 1];
            fwrite(conv.output, sizeof(float), conv.outputs, out);
        }
    }
    fclose(out);
    return 0;
}
"""


def compile_harness(darknet: Path, folder: Path) -> Path:
    """Compile the harness against a Darknet build; returns the executable.

    Raises:
        ValueError: the folder has no include/darknet.h or no libdarknet.a / libdarknet.so.
        subprocess.CalledProcessError: gcc failed.
    """
    header = darknet / "include" / "darknet.h"
    if not header.is_file():
        raise ValueError(f"{darknet} has no include/darknet.h: not a Darknet source tree")
    fork = "load_network_custom" in header.read_text(errors="replace")
    library = next((darknet / n for n in ("libdarknet.so", "libdarknet.a") if (darknet / n).is_file()), None)
    if library is None:
        raise ValueError(f"{darknet} has no libdarknet.so or libdarknet.a: build it first (the fork: make LIBSO=1)")
    source, executable = folder / "harness.c", folder / "harness"
    source.write_text(HARNESS)
    command = ["gcc", "-O2", *(["-DFORK"] if fork else []), f"-I{darknet / 'include'}", str(source), str(library),
               f"-Wl,-rpath,{darknet}", "-lm", "-pthread", "-lstdc++", "-o", str(executable)]
    subprocess.run(command, check=True)
    return executable


def random_weights(model, seed: int) -> None:
    """Random weights, batch-norm variances positive and some of them small (where the two Darknet
    batch-norm formulas differ most)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        values = rng.normal(0.0, 0.1, weight.shape).astype(np.float32)
        if "moving_variance" in weight.name:
            values = np.abs(values) + 1e-4
        weight.assign(values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a zoo name (yolov2, yolov3-tiny, yolov4-tiny, ...)")
    parser.add_argument("--darknet", required=True, type=Path, help="a built Darknet source tree")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--ratio", type=float, default=0.5, help="share of the filters removed")
    parser.add_argument("--bn-formula", choices=["original", "alexeyab"], default=None)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference allowed, relative to the largest output (at least 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = build_model(zoo.cfg_path(args.model), input_size=args.size, width=args.width, classes=3,
                        bn_formula=args.bn_formula)
    random_weights(model, args.seed)
    pruned = prune_filters(model, args.ratio, "l1").model
    image = np.random.default_rng(args.seed + 1).random((args.size, args.size, 3)).astype(np.float32)
    outputs = pruned(image[None], training=False)
    outputs = [np.asarray(o)[0] for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        harness = compile_harness(args.darknet.resolve(), folder)
        cfg = export_darknet(pruned, folder / "model.weights")
        image.transpose(2, 0, 1).astype("<f4").tofile(folder / "image.f32")  # Darknet reads CHW
        subprocess.run([str(harness), cfg, str(folder / "model.weights"), str(folder / "image.f32"),
                        str(folder / "out.f32")], check=True, capture_output=True)
        darknet_out = np.fromfile(folder / "out.f32", dtype="<f4")
    expected = sum(o.size for o in outputs)
    if darknet_out.size != expected:
        print(f"Darknet wrote {darknet_out.size} head values, Keras has {expected}")
        return 1
    worst, offset = 0.0, 0
    for output in outputs:
        height, width, channels = output.shape
        theirs = darknet_out[offset: offset + output.size].reshape(channels, height, width).transpose(1, 2, 0)
        offset += output.size
        worst = max(worst, float(np.max(np.abs(theirs - output))))
    peak = max(float(np.max(np.abs(o))) for o in outputs)
    print(f"{args.model} at {args.size} px, width {args.width}, {args.ratio:.0%} of the filters removed "
          f"({count(model)} -> {count(pruned)} parameters): max |Darknet - Keras| = {worst:.3g} "
          f"(outputs up to {peak:.3g})")
    return 0 if worst <= args.tolerance * max(1.0, peak) else 1


def count(model) -> str:
    return f"{model.count_params():,}"


if __name__ == "__main__":
    sys.exit(main())
