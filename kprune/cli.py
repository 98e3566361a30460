"""The ``kprune`` command line: parse arguments, call the library, print. No logic lives here.

Each command imports the library inside its function: the library imports TensorFlow (several
seconds), which ``kprune --help`` and a mistyped option should not wait for.
"""

from __future__ import annotations

import json
import os

import click

from kprune.models.bn_formulas import BN_FORMULAS  # the registries load without TensorFlow
from kprune.prune.allocation import ALLOCATIONS
from kprune.prune.importance import CRITERIA
from kprune.prune.methods import METHODS
from kprune.prune.recovery import RECOVERIES
from kprune.prune.schedules import SCHEDULES
from kprune.report.runtimes import RUNTIMES

#: the scopes kprune.prune.scope.SCOPES knows (it imports TensorFlow; tests check this text against it)
SCOPE_HELP = ("all, backbone, head, a two-stage detector's fpn, rpn or roi_head, or a regular expression on "
              "layer names.")


class _Group(click.Group):
    """Bad input raises ValueError in the library; show it as a one-line error, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        except RuntimeError as exc:  # a training run that stopped (kprune.train.TrainingError)
            if type(exc).__name__ != "TrainingError":
                raise
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}") from None


@click.group(cls=_Group)
@click.version_option(package_name="kprune")
def main():
    """kprune: prune, retrain, evaluate and export object detectors (YOLO, SSD)."""


@main.group()
def darknet():
    """Convert between Darknet (cfg + .weights) and .keras models."""


@darknet.command("convert")
@click.argument("cfg", type=click.Path(dir_okay=False))
@click.argument("weights", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--reorg", type=click.Choice(["darknet", "space_to_depth"]), default="darknet", show_default=True,
              help="darknet: exact Darknet reorg (for Darknet-trained weights); space_to_depth: TF's op.")
@click.option("--names", type=click.Path(dir_okay=False), help="Class names file, one per line.")
@click.option("--bn-formula", type=click.Choice(list(BN_FORMULAS)), default=None,
              help="Batch norm: " + "; ".join(f"{k}: {f.description}" for k, f in BN_FORMULAS.items())
              + ". Default: the fork's when the cfg uses a feature only AlexeyAB's fork has, else the original's.")
def darknet_convert(cfg, weights, out, reorg, names, bn_formula):
    """Build CFG, load WEIGHTS into it and save it as OUT (.keras)."""
    from kprune.darknet.convert import load_darknet
    from kprune.models.inference import read_names
    from kprune.models.io import save_model
    from kprune.models.counting import count_params

    if not out.endswith(".keras"):
        raise click.BadParameter(f"{out} must end in .keras", param_hint="OUT")
    model = load_darknet(cfg, weights, reorg_mode=reorg, names=read_names(names) if names else None,
                         bn_formula=bn_formula)
    save_model(model, out)
    click.echo(f"saved {out}: {count_params(model)['params']:,} parameters")


@darknet.command("export")
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def darknet_export(model_path, out):
    """Write a model built from a Darknet cfg as OUT (.weights) and its cfg beside it (OUT's stem +
    .cfg), as the model now is (pruned filters, width, input size), for Darknet to load: pjreddie's
    or AlexeyAB's fork (only the fork reads the fork's features). The cfg's top comment says which
    of them computes the model's batch norm exactly."""
    from kprune.darknet.convert import export_darknet
    from kprune.models.io import load_model

    cfg = export_darknet(load_model(model_path), out)
    click.echo(f"wrote {out}: {os.path.getsize(out):,} bytes, and {cfg}")


@main.command()
@click.argument("model_path", metavar="[MODEL.keras]", required=False, type=click.Path(dir_okay=False))
@click.option("--cfg", help="A zoo model name of any family or a Darknet cfg file (instead of MODEL.keras).")
@click.option("--size", type=int, help="Input size override, with --cfg (a multiple of 32 for YOLO).")
@click.option("--classes", type=int, help="Number of classes override, with --cfg.")
@click.option("--width", type=float, default=1.0, show_default=True, help="Width multiplier, with --cfg.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model_path, cfg, size, classes, width, as_json):
    """Parameters, FLOPs, boxes per image and shapes of a model or a zoo name / cfg."""
    from kprune import detectors
    from kprune.models.counting import model_info

    if (model_path is None) == (cfg is None):
        raise click.UsageError("give either MODEL.keras or --cfg CFG")
    if cfg is not None:
        model = detectors.build(cfg, input_size=size, classes=classes, width=width)
    else:
        if size is not None or classes is not None or width != 1.0:
            raise click.UsageError("--size, --classes and --width go with --cfg")
        from kprune.models.io import load_model

        model = load_model(model_path)
    result = model_info(model)
    try:
        family = detectors.family_of(model)
        result.update({"family": family.name, "boxes": family.boxes_per_image(model),
                       "classes": family.num_classes(model)})
    except ValueError:
        pass  # a Keras model of no detector family: its counts and shapes only
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        shown = f"{value:,}" if isinstance(value, int) else value
        click.echo(f"{key:>22}: {shown}")


@main.command()
@click.argument("name")
@click.argument("out", metavar="OUT.keras", type=click.Path(dir_okay=False))
@click.option("--size", type=int, help="Input size  [default: the model's own].")
@click.option("--classes", type=int, help="Number of object classes  [default: the model's own].")
@click.option("--names", type=click.Path(dir_okay=False), help="Class names file, one per line (sets --classes).")
@click.option("--width", type=float, default=1.0, show_default=True, help="Width multiplier.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial weights.")
def init(name, out, size, classes, names, width, seed):
    """Write a freshly initialised model of zoo model NAME (any family) or of a Darknet cfg file.

    Zoo models: yolov2, yolov2-tiny, yolov2-tiny-voc, yolov2-voc, yolov3, yolov3-tiny, ssd300-vgg16,
    ssdlite-mobilenetv2 (an unknown NAME is refused with the current list).
    """
    from kprune import detectors
    from kprune._keras import keras
    from kprune.models.inference import read_names
    from kprune.models.io import save_model

    class_names = read_names(names) if names else None
    if class_names is not None and classes is not None and classes != len(class_names):
        raise click.UsageError(f"--classes {classes} but {names} lists {len(class_names)} names")
    keras.utils.set_random_seed(seed)
    model = detectors.build(name, input_size=size, classes=classes if class_names is None else len(class_names),
                            width=width, names=class_names)
    save_model(model, out)
    family = detectors.family_of(model)
    click.echo(f"wrote {out}: {family.name} model {model.name}, {model.input_shape[1]} px, "
               f"{family.num_classes(model)} classes, {model.count_params():,} parameters")


@main.command()
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(dir_okay=False))
@click.argument("input_path", metavar="INPUT.npy", type=click.Path(dir_okay=False))
@click.argument("out", metavar="OUT.npz", type=click.Path(dir_okay=False))
def predict(model_path, input_path, out):
    """Raw head outputs (output_0, output_1, ...) for float images in [0, 1] at the input size."""
    import numpy as np

    from kprune.models.inference import check_input_batch, predict_raw
    from kprune.fileio import atomic_path
    from kprune.models.io import load_model

    model = load_model(model_path)
    try:
        array = np.load(input_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {input_path} as a .npy array: {exc}") from None
    outputs = predict_raw(model, check_input_batch(array, model, input_path))
    with atomic_path(out, suffix=".npz") as tmp:
        np.savez(tmp, **{f"output_{i}": o for i, o in enumerate(outputs)})
    click.echo(f"wrote {out}: " + ", ".join(f"output_{i} {o.shape}" for i, o in enumerate(outputs)))


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--score", type=click.FloatRange(0, 1), default=0.25, show_default=True, help="Score threshold.")
@click.option("--iou", type=click.FloatRange(0, 1), default=0.45, show_default=True,
              help="NMS IoU threshold (a .tflite file exported with --postprocess uses its own).")
@click.option("--keras", "keras_path", type=click.Path(dir_okay=False),
              help="For a .tflite MODEL: the .keras model it was converted from (default: same name).")
@click.option("--names", type=click.Path(dir_okay=False), help="Class names file (default: names in the model).")
@click.option("--no-letterbox", is_flag=True, help="Stretch images to the input instead of letterboxing.")
def detect(model_path, images, out, score, iou, keras_path, names, no_letterbox):
    """Detect objects in IMAGE files with MODEL (.keras or .tflite, run by LiteRT); write annotated
    images and detections.json (COCO results)."""
    from kprune.detectors.inference import detect_files
    from kprune.evaluate import load_for_inference
    from kprune.models.inference import read_names

    model, predict, detections, _ = load_for_inference(model_path, keras_path)
    if detections is not None:
        click.echo(f"{model_path} has its own post-processing: NMS at IoU {detections.options['nms_iou_threshold']:.3g}, "
                   f"at most {detections.options['max_detections']} detections (--iou is not used)")
    class_names = read_names(names) if names else None
    results = detect_files(model, images, out, score, iou, letterbox=not no_letterbox, names=class_names,
                           predict=predict, detections=detections)
    click.echo(f"{len(results)} detections in {len(images)} images -> {out}")


@main.command()
@click.argument("model_path", metavar="MODEL", required=False, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(file_okay=False), help="Converted dataset folder (with dataset.json).")
@click.option("--split", default="val", show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--keras", "keras_path", type=click.Path(dir_okay=False),
              help="For a .tflite MODEL: the .keras model it was converted from (default: same name).")
@click.option("--detections", type=click.Path(dir_okay=False), help="Detections in the COCO results format.")
@click.option("--ground-truth", type=click.Path(dir_okay=False), help="Ground truth in the COCO instances format.")
@click.option("--no-letterbox", is_flag=True, help="Stretch images to the input instead of letterboxing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(model_path, data, split, batch_size, keras_path, detections, ground_truth, no_letterbox, as_json):
    """mAP of MODEL (.keras or .tflite) on a dataset, or of COCO-format detections against ground truth.

    Detections at score >= 0.001, at most 100 per image; VOC AP at IoU 0.5 (all-point and 11-point),
    COCO mAP@[.5:.95] and AP50 from pycocotools, per-class AP and recall. A .tflite exported with
    --postprocess is scored on the detections its own post-processing op gives.
    """
    from kprune import evaluate as ev

    if model_path:
        if not data or detections or ground_truth:
            raise click.UsageError("give MODEL with --data, or --detections with --ground-truth")
        result = ev.evaluate_model(model_path, data, split, batch_size, keras_path, letterbox=not no_letterbox,
                                   progress=not as_json)
    else:
        if not (detections and ground_truth) or data:
            raise click.UsageError("give MODEL with --data, or --detections with --ground-truth")
        result = ev.evaluate_files(detections, ground_truth)
    if as_json:
        from kprune.fileio import json_safe

        result.pop("coco_summary", None)
        click.echo(json.dumps(json_safe(result), indent=1, allow_nan=False))
    else:
        click.echo(ev.report_table(result))
        for note in result.get("notes", []):
            click.echo(f"note: {note}")


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Converted dataset folder.")
@click.option("--model", "model_name", default="yolov2", show_default=True,
              help="Zoo model name (any family with anchors) or Darknet cfg: the anchors to fit.")
@click.option("--size", required=True, type=int, help="Network input size (YOLOv2 anchors are in its grid cells).")
@click.option("--split", default="train", show_default=True)
@click.option("--no-letterbox", is_flag=True, help="Images are stretched to the input instead of letterboxed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def anchors(data, model_name, size, split, no_letterbox, as_json):
    """Fit anchors to a dataset's boxes (YOLOv2's dimension clusters) and print them as a cfg line.

    In a training config, `anchors: kmeans` does the same for the model being trained.
    """
    from kprune import detectors
    from kprune.data.anchors import format_anchors

    model = detectors.build(model_name, input_size=size)
    family = detectors.family_of(model)
    if not hasattr(family, "fit_anchors"):
        raise click.UsageError(f"{model_name}: a {family.name} model has no anchors to fit")
    fitted = family.fit_anchors(model, data, split, letterbox=not no_letterbox)
    if as_json:
        click.echo(json.dumps(fitted))
        return
    click.echo(f"anchors = {format_anchors(fitted['anchors'][0])}" if "anchors" in fitted else fitted["text"])
    click.echo(f"mean IoU of the {split} boxes with their best anchor: {fitted['mean_iou_before']:.3f} with "
               f"{model_name}'s anchors, {fitted['mean_iou']:.3f} with these")


@main.command()
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue the run in the config's out folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(config_path, resume, quiet):
    """Train a detector as CONFIG.yaml says (keys of kprune.train.TrainConfig; `base:` inherits)."""
    from kprune.config import read_yaml
    from kprune.retrain import run

    values = read_yaml(config_path)
    run(values, config_path, resume, quiet)


def _layer_ratio(ctx, param, values):
    out = {}
    for text in values:
        name, sep, ratio = text.partition("=")
        try:
            out[name] = float(ratio)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise click.BadParameter(f"{text!r}: expected LAYER=RATIO, e.g. conv_4=0.5")
    return out


@main.command()
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(dir_okay=False))
@click.option("--method", required=True, type=click.Choice(list(METHODS)),
              help="; ".join(f"{name}: {m.description}" for name, m in METHODS.items()))
@click.option("--ratio", type=float, help="Fraction of filters (filters) or of weights (sparsity) to remove.")
@click.option("--remove-flops", type=float, metavar="FRACTION",
              help="Instead of --ratio (method filters, schedule once, any allocation): remove at least this "
                   "fraction of the FLOPs, with the smallest ratio that does.")
@click.option("--target-latency", type=float, metavar="MS",
              help="Instead of --ratio (as --remove-flops): prune until the model runs in MS milliseconds at batch 1 "
                   "on --runtime with --threads, predicted from per-layer latency tables (measured once per host, "
                   "cached) and checked by measuring.")
@click.option("--runtime", type=click.Choice(list(RUNTIMES)), default="tflite", show_default=True,
              help="What --target-latency is measured on: " + "; ".join(
                  f"{name}: {runtime.description}" for name, runtime in RUNTIMES.items()) + ".")
@click.option("--threads", type=int, default=1, show_default=True, help="Threads of --runtime.")
@click.option("--sensitivity", "sensitivity_file", type=click.Path(dir_okay=False), metavar="SENSITIVITY.json",
              help="Curves of kprune sensitivity, for --allocation sensitivity.")
@click.option("--threshold", type=float, help="Magnitude below which weights go (method threshold).")
@click.option("--reconstruct", is_flag=True,
              help=f"{RECOVERIES['reconstruct'].description} (filter pruning; images of --data).")
@click.option("--criterion", type=click.Choice(list(CRITERIA)),
              help="Filter importance (method filters) [default: l1-normalized for gradual, l1 otherwise]; "
                   "taylor scores on the first batches of --data.")
@click.option("--allocation", type=click.Choice(list(ALLOCATIONS)),
              help="How the filters removed spread over the layers (method filters) [default: global for "
                   "--schedule gradual, uniform otherwise]. " + "; ".join(
                       f"{name}: {a.description}" for name, a in ALLOCATIONS.items()))
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default="once", show_default=True,
              help="When the filters go (method filters). " + "; ".join(
                  f"{name}: {t.description}" for name, t in SCHEDULES.items()))
@click.option("--rounds", type=int, help="Rounds of gradual (default 4) or at most, of iterative (default 10).")
@click.option("--max-drop", type=float,
              help="iterative: the largest mAP@0.5 drop accepted, as a fraction (default 0.02 = 2 points).")
@click.option("--layer-ratio", multiple=True, callback=_layer_ratio, metavar="LAYER=RATIO",
              help="Per-layer ratio for --allocation independent (LAYER may be a regular expression); repeatable.")
@click.option("--scope", default="all", show_default=True,
              help=SCOPE_HELP)
@click.option("--include-outputs", is_flag=True, help="Also prune the output convs (sparsity methods).")
@click.option("--round-to", type=int, default=8, show_default=True, help="Kept filters per layer: a multiple of this.")
@click.option("--max-ratio", type=float, default=0.9, show_default=True, help="At most this fraction of a layer's filters.")
@click.option("--data", type=click.Path(file_okay=False), help="Dataset to retrain on (with --epochs).")
@click.option("--epochs", type=int, help="Retraining epochs (with --data); per round for gradual and iterative.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Retraining learning rate.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Retraining batch size.")
@click.option("--distill", type=float, metavar="WEIGHT", help=f"{RECOVERIES['distill'].description}.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The pruned model (.keras).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar while retraining.")
def prune(model_path, method, ratio, remove_flops, target_latency, runtime, threads, sensitivity_file, threshold,
          reconstruct, criterion, allocation, schedule, rounds, max_drop, layer_ratio, scope, include_outputs, round_to, max_ratio,
          data, epochs, lr, batch_size, distill, out, as_json, quiet):
    """Prune MODEL.keras by one method, optionally retrain, and save the result to --out."""
    from kprune.prune.command import dumps, prune_model, summary
    from kprune.train.config import dense_distillation
    from kprune.prune.sensitivity import read_sensitivity
    from kprune.report.runtimes import get_runtime

    if sensitivity_file is not None and allocation != "sensitivity":
        raise click.UsageError("--sensitivity is read by --allocation sensitivity only")

    report = prune_model(model_path, out, method, ratio=ratio, threshold=threshold, criterion=criterion,
                         allocation=allocation, schedule=schedule, scope=scope, include_outputs=include_outputs, round_to=round_to,
                         max_ratio=max_ratio, layer_ratios=layer_ratio, data=data, epochs=epochs,
                         train_options={"lr": lr, "batch_size": batch_size,
                                        **({"distill": dense_distillation(distill)} if distill else {})},
                         rounds=rounds, max_drop=max_drop,
                         progress=not quiet and not as_json, remove_flops=remove_flops, reconstruct=reconstruct,
                         target_latency=target_latency,
                         runtime=get_runtime(runtime, threads) if target_latency is not None else None,
                         sensitivity=read_sensitivity(sensitivity_file) if sensitivity_file else None)
    click.echo(dumps(report) if as_json else summary(report))



@main.command()
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["tflite", "saved_model"]), default="tflite", show_default=True)
@click.option("--quant", type=click.Choice(["none", "fp16", "dynamic", "int8"]), default="none", show_default=True,
              help="TFLite quantization; int8 is full-integer, calibrated on --data.")
@click.option("--data", type=click.Path(file_okay=False),
              help="Converted dataset: calibration images (train) and check images (val).")
@click.option("--io", type=click.Choice(["float", "int8", "uint8"]), default="float", show_default=True,
              help="Input/output type of an int8 model (integer io: the app applies the printed scale).")
@click.option("--sparse", is_flag=True, help="Store pruned zeros in TFLite's sparse format.")
@click.option("--calibration", type=int, default=100, show_default=True, help="Calibration images for int8.")
@click.option("--postprocess", is_flag=True,
              help="Decode and NMS inside the .tflite (TFLite_Detection_PostProcess): outputs boxes, classes, "
                   "scores, count, as MediaPipe's ObjectDetector and the TFLite Task Library read them.")
@click.option("--nms-score", type=float, default=0.001, show_default=True,
              help="With --postprocess: the lowest score kept (0.001 keeps what mAP needs; apps filter on top).")
@click.option("--nms-iou", type=float, default=0.45, show_default=True, help="With --postprocess: NMS IoU threshold.")
@click.option("--max-detections", type=int, default=100, show_default=True,
              help="With --postprocess: detections per image.")
@click.option("--qat-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --quant int8: quantization-aware training for this many epochs on --data before the "
                   "conversion (the run goes to OUT.qat/).")
@click.option("--qat-config", type=click.Path(dir_okay=False),
              help="With --qat-epochs: the model's training config (e.g. its run's config.yaml); QAT takes its "
                   "batch size, loss and augmentation.")
@click.option("--qat-lr", type=float, default=None, help="With --qat-epochs: the learning rate [default: 1e-4].")
@click.option("--ptq", multiple=True, type=click.Choice(["equalize", "bias-correction", "per-tensor"]),
              help="With --quant int8, repeatable: post-training quantization options, applied in this order: "
                   "cross-layer equalisation, bias correction, per-tensor weights (default: per channel).")
@click.option("--out", required=True, type=click.Path(), help="OUT.tflite, or a folder for saved_model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export(model_path, fmt, quant, data, io, sparse, calibration, postprocess, nms_score, nms_iou, max_detections,
           qat_epochs, qat_config, qat_lr, ptq, out, as_json):
    """Export MODEL.keras for deployment and check the result against Keras on real images.

    By default the export ends at the raw head outputs: decoding and NMS run on the phone side (the
    anchors are in OUT.json); with --postprocess they run inside the file. `kprune evaluate
    OUT.tflite` scores either exactly as an app would run it.
    """
    from kprune.export.command import export_model, summary
    from kprune.export.postprocess import PostprocessOptions
    from kprune.fileio import json_safe

    options = None
    if postprocess:
        options = PostprocessOptions(nms_score, nms_iou, max_detections)
    elif (nms_score, nms_iou, max_detections) != (0.001, 0.45, 100):
        raise click.UsageError("--nms-score, --nms-iou and --max-detections apply with --postprocess")
    qat_options = None
    if qat_epochs:
        from kprune.config import read_yaml
        from kprune.export.qat import qat_options as make_qat_options

        qat_options = make_qat_options(read_yaml(qat_config) if qat_config else None, lr=qat_lr)
    elif qat_config or qat_lr is not None:
        raise click.UsageError("--qat-config and --qat-lr apply with --qat-epochs")
    report = export_model(model_path, out, fmt, quant, data, io, sparse, calibration, postprocess=options,
                          qat_epochs=qat_epochs, qat_options=qat_options, ptq=list(ptq))
    click.echo(json.dumps(json_safe(report), indent=1) if as_json else summary(report))


@main.command()
@click.argument("models", metavar="MODEL.keras...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(file_okay=False), help="Converted dataset: adds mAP@0.5 and COCO mAP (val).")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per latency, after 3 warm-up runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def report(models, data, runs, as_json):
    """Parameters, FLOPs, file sizes (also gzip / bzip2 / xz), Keras and TFLite latency at 1 and 2
    threads, and mAP of each MODEL."""
    from kprune.fileio import json_safe
    from kprune.report.command import report_models, table

    rows = report_models(models, data, runs, progress=not as_json)
    click.echo(json.dumps(json_safe(rows), indent=1) if as_json else table(rows))


@main.command()
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--list", "list_parts", is_flag=True,
              help="Print the parts (baselines, cells, dense controls, compared trainings), one per line: name, "
                   "kind, done or not, what it is.")
@click.option("--cell", "names", multiple=True, metavar="NAME",
              help="Run only this part (repeatable), after the baseline it needs; no report.")
@click.option("--report", "report_only", is_flag=True, help="Write the report of the parts done so far; run nothing.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the parts as Ray tasks (pip install 'kprune[ray]'): on the cluster at ADDRESS, or a local "
                   "one; each part asks the config's ray: {cpus, gpus, retries}.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def experiment(config_path, list_parts, names, report_only, ray_address, quiet):
    """Run a pruning sweep (baseline, then prune -> evaluate -> retrain -> evaluate -> export ->
    measure for every method x ratio) and write report.md, results.csv/json and plots. Cells already
    done are skipped when the same config is run again.

    The parts can also run one by one, e.g. in parallel on several machines sharing the run folder:
    `--list`, then `--cell NAME` for each, then `--report`.
    """
    from kprune.experiment import Experiment, load_config

    if sum((list_parts, bool(names), report_only, ray_address is not None)) > 1:
        raise click.UsageError("give one of --list, --cell, --report and --ray")
    config = load_config(config_path)
    log = (lambda line: click.echo(line, err=True))
    runner = Experiment(config, progress=not quiet, log=log)
    if list_parts:
        for part in runner.parts().values():
            state = "done" if (part.folder / "result.json").is_file() else "to do"
            click.echo(f"{part.name}\t{part.kind}\t{state}\t{part.what}")
        return
    if names:
        for name in names:
            result = runner.run_part(name)
            click.echo(f"{name}: done, mAP@0.5 {result['map50']:.4f} ({runner.parts()[name].folder})")
        return
    if ray_address is not None:
        from kprune.experiment import run_on_ray

        results = run_on_ray(config, ray_address or None, log=log)
    else:
        results = runner.report() if report_only else runner.run()
    from kprune.report.experiment import headline_table

    click.echo(headline_table(results["flat"]))
    click.echo(f"report: {config.out}/report.md")


def _ratios(ctx, param, value):
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated fractions, e.g. 0.1,0.3,0.5") from None


@main.command()
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Converted dataset folder.")
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True, callback=_ratios,
              help="Fractions of each layer's filters to remove, comma-separated.")
@click.option("--criterion", type=click.Choice(list(CRITERIA)), default="l1",
              show_default=True, help="Which filters go first.")
@click.option("--scope", default="all", show_default=True,
              help=SCOPE_HELP)
@click.option("--round-to", type=int, default=1, show_default=True, help="Kept filters: a multiple of this.")
@click.option("--split", default="val", show_default=True)
@click.option("--limit", type=int, help="Evaluate only the first N images of the split (faster, noisier).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for sensitivity.json, .csv and .png [default: MODEL.sensitivity].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sensitivity(model_path, data, ratios, criterion, scope, round_to, split, limit, batch_size, out, as_json, quiet):
    """Prune each layer of MODEL.keras alone at each ratio and report the mAP@0.5 without retraining
    (a table, and a plot in --out)."""
    from pathlib import Path

    from kprune.fileio import json_safe, write_csv_atomic, write_json_atomic
    from kprune.models.io import load_model
    from kprune.prune.sensitivity import analyze, rows, table
    from kprune.report.plots import sensitivity_plot

    result = analyze(load_model(model_path), data, ratios, criterion, scope, round_to, split, batch_size, limit,
                     progress=not quiet and not as_json)
    folder = Path(out or str(Path(model_path).with_suffix("")) + ".sensitivity")
    write_json_atomic(folder / "sensitivity.json", result)
    write_csv_atomic(folder / "sensitivity.csv", rows(result))
    sensitivity_plot(result, folder / "sensitivity.png")
    if as_json:
        click.echo(json.dumps(json_safe(result), indent=1))
    else:
        click.echo(table(result))
        click.echo(f"saved {folder}/sensitivity.json, .csv and .png")


if __name__ == "__main__":
    main()
