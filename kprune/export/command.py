"""``kprune export``: a detector to a TFLite file or a SavedModel, checked against Keras.

:func:`export` takes a model in memory; :func:`export_model` is the adapter that reads a ``.keras`` file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from io import StringIO
from typing import Optional, Sequence

import numpy as np

from kprune._keras import tf
from kprune.data.tfrecord import read_manifest
from kprune.detectors import family_of
from kprune.detectors.inference import decode_and_suppress
from kprune.export.compat import compatibility
from kprune.export.compat import text as compatibility_text
from kprune.export.metadata import embed_detector_metadata
from kprune.export.postprocess import PostprocessOptions, compare_detections
from kprune.export.ptq import check_ptq
from kprune.export.ptq import prepare as prepare_ptq
from kprune.export.qat import quantize_aware_train
from kprune.export.tflite import calibration_images, compare, convert, differences
from kprune.fileio import write_bytes_atomic, write_json_atomic
from kprune.models.io import load_model
from kprune.models.litert import DETECTION_OP, DetectionRunner, TFLiteRunner

FORMATS = ("tflite", "saved_model")
CHECK_IMAGES = 8
#: images of the check split a detection-checked export (a two-stage detector) is scored on, Keras and file
CHECK_MAP_IMAGES = 100


def _check_images(model, data, count: int) -> tuple:
    """Images to compare the export with Keras on: the dataset's validation images, or seeded
    random ones without a dataset."""
    size = model.input_shape[1]
    if data is not None:
        manifest = read_manifest(data)
        split = "val" if manifest.num_images("val") else "train"
        return calibration_images(manifest, count, split, size), f"{split} images"
    return np.random.default_rng(0).random((count, size, size, 3), dtype=np.float32), "random images"


def check_detections(runner, model, images: np.ndarray, data: Optional[str], quant: str) -> dict:
    """A raw-output file's detections against Keras', for a family whose raw outputs alone do not
    say whether the file detects what the model detects
    (:meth:`~kprune.detectors.base.DetectorFamily.checks_detections`: a two-stage detector, whose
    proposals are a ranking that int8 reorders).

    Returns:
        ``detections``: :func:`~kprune.export.postprocess.compare_detections` of the file (decoded
        and suppressed as ``kprune detect`` does) on ``images``, quantized files at scores >= 0.25
        (what an app shows); with ``data`` also ``map50``: ``{"keras", "file", "images", "split"}``,
        mAP@0.5 of both on the first :data:`CHECK_MAP_IMAGES` images of the check split.
    """
    from kprune.evaluate import evaluate_loaded

    options = PostprocessOptions()
    min_score = 0.0 if quant == "none" else 0.25

    def detect(batch):
        return decode_and_suppress(model, runner(batch), max(options.score_threshold, min_score),
                                   options.iou_threshold, options.max_detections)

    result = {"detections": compare_detections(detect, model, images, options, min_score)}
    if data is not None:
        manifest = read_manifest(data)
        split = "val" if manifest.num_images("val") else "train"
        count = min(CHECK_MAP_IMAGES, manifest.num_images(split))
        keras_map = evaluate_loaded(model, manifest, split, limit=count)["map50"]
        file_map = evaluate_loaded(model, manifest, split, limit=count, predict=runner)["map50"]
        result["map50"] = {"keras": keras_map, "file": file_map, "images": int(count), "split": split}
    return result


def _replace_dir(tmp: str, path: str) -> None:
    """Move the folder ``tmp`` to ``path``; an existing ``path`` is removed only after."""
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(path)))
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old)


def metadata_names(model, family) -> list:
    """The class names an export carries: the model's, or the class indices as text."""
    return list(family.class_names(model) or [str(i) for i in range(family.num_classes(model))])


def decoder_metadata(model, family, io_quantization: Optional[dict] = None,
                     postprocess: Optional[PostprocessOptions] = None) -> dict:
    """What a phone-side decoder needs to use an exported model: the family's output layout and
    anchors (:meth:`~kprune.detectors.base.DetectorFamily.export_metadata`), or, for a post-processed
    export, its four outputs and the op's settings; the class names and the input normalisation
    (and, for integer io, the tensors' quantization)."""
    height, width, channels = model.input_shape[1:]
    metadata = {
        "family": family.name,
        "model": model.name,
        "input": {"height": int(height), "width": int(width), "channels": int(channels),
                  "normalisation": "RGB, float = pixel / 255 (0..1); the model does its own normalisation after",
                  "fit": "letterbox: scale to fit keeping the aspect ratio, centre, pad with 0.5 grey"},
        "classes": metadata_names(model, family),
        "boxes_per_image": family.boxes_per_image(model),
    }
    if postprocess is None:
        metadata.update(family.export_metadata(model))
    else:
        rows = postprocess.max_detections
        metadata["outputs"] = {
            "detection_boxes": f"(1, {rows}, 4): ymin, xmin, ymax, xmax normalised to the input (letterboxed)",
            "detection_classes": f"(1, {rows}): class index into classes (float)",
            "detection_scores": f"(1, {rows})",
            "num_detections": "(1,): how many rows are detections, best first"}
        metadata["postprocess"] = {"op": DETECTION_OP, "nms": "per class", **dataclasses.asdict(postprocess)}
    if io_quantization:
        metadata["io_quantization"] = io_quantization
    return metadata


def check_options(out: str, format: str = "tflite", quant: str = "none", data: Optional[str] = None,
                  io: str = "float", sparse: bool = False, postprocess: Optional[PostprocessOptions] = None,
                  qat_epochs: int = 0, ptq: Sequence[str] = ()) -> None:
    """Refuse export options that do not fit together, before any work is done.

    Raises:
        ValueError: an unknown format, an output name that does not fit the format, TFLite options
            for a SavedModel, int8 without data, QAT epochs that are not a whole number >= 0, unknown
            PTQ options, QAT or PTQ options without int8, or both together.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "tflite" and not str(out).endswith(".tflite"):
        raise ValueError(f"--out {out}: a TFLite export must end in .tflite")
    if format == "saved_model" and (quant != "none" or io != "float" or sparse or postprocess is not None):
        raise ValueError("--quant, --io, --sparse and --postprocess apply to TFLite; a SavedModel keeps the float model")
    if quant == "int8" and data is None:
        raise ValueError("int8 quantization is calibrated on real images: give --data DATASET_DIR")
    check_ptq(ptq)
    if int(qat_epochs) != qat_epochs or qat_epochs < 0:
        raise ValueError(f"--qat-epochs {qat_epochs!r}: a whole number of epochs >= 0")
    if (qat_epochs or ptq) and quant != "int8":
        raise ValueError("--qat-epochs and --ptq prepare a full-integer file: add --quant int8")
    if qat_epochs and ptq:
        raise ValueError("--ptq transforms a float model for post-training quantization, --qat-epochs trains "
                         "the model for int8 itself: give one of them")


def export(model, out: str, format: str = "tflite", quant: str = "none", data: Optional[str] = None,
           io: str = "float", sparse: bool = False, calibration: int = 100,
           postprocess: Optional[PostprocessOptions] = None, qat_epochs: int = 0, qat_options: Optional[dict] = None,
           ptq: Sequence[str] = ()) -> dict:
    """Export ``model`` (in memory, left unchanged) to ``out`` and compare the result with it.

    A TFLite export also gets the decoder metadata (:func:`decoder_metadata`) beside it, as
    ``OUT.json``.

    Args:
        format: ``tflite`` (a ``.tflite`` file) or ``saved_model`` (a folder).
        quant, io, sparse: see :mod:`kprune.export.tflite` (TFLite only).
        data: a converted dataset: calibration images (``train`` split, ``calibration`` of them,
            needed by ``int8``) and check images (``val``); without it the check uses random images.
        postprocess: end the file in the detection post-processing op with these settings
            (:mod:`kprune.export.postprocess`; TFLite only).
        qat_epochs, qat_options: int8 only: first train the model this many epochs with
            quantization-aware training on ``data`` (:func:`kprune.export.qat.quantize_aware_train`,
            with these training options; its run in ``OUT.qat/``), then convert the QAT model; the
            check compares the file with the QAT model.
        ptq: int8 only: post-training options (:mod:`kprune.export.ptq`: ``equalize``,
            ``bias-correction``, ``per-tensor``) applied to the float model before the conversion.

    Returns:
        The report: ``format``, ``quant``, ``io``, ``sparse``, ``out``, ``family``, ``description``,
        ``check`` (``images``, ``on`` and :func:`~kprune.export.tflite.differences`, or for a
        post-processed file :func:`~kprune.export.postprocess.compare_detections`),
        ``bytes``; for TFLite also ``io_quantization`` (dtype, scale, zero point of the input and
        outputs), ``metadata_file``, ``compatibility`` (:func:`kprune.export.compat.compatibility`), for int8 ``calibration_images`` and with ``postprocess`` its settings;
        with QAT ``qat`` (``epochs``, ``run``, ``map50`` of the QAT model in Keras), with PTQ options
        ``ptq`` (:func:`kprune.export.ptq.prepare`'s report).

    Raises:
        ValueError: unknown format, options that do not fit the format, int8 without data, an
            output name that does not fit the format, or a conversion that fails.
    """
    check_options(out, format, quant, data, io, sparse, postprocess, qat_epochs, ptq)
    family = family_of(model)
    images, on = _check_images(model, data, CHECK_IMAGES)
    report = {"format": format, "quant": quant, "io": io, "sparse": sparse, "out": str(out), "family": family.name,
              "description": family.describe(model)}
    if format == "tflite":
        calibration_set = None
        if quant == "int8":
            calibration_set = calibration_images(data, calibration, "train", model.input_shape[1])
            report["calibration_images"] = int(len(calibration_set))
        source, per_channel = model, True  # what is converted: the model, its QAT model or its PTQ-prepared copy
        if qat_epochs:
            run_dir = str(out)[: -len(".tflite")] + ".qat"
            source, trained = quantize_aware_train(model, data, qat_epochs, qat_options, run_dir=run_dir,
                                                   calibration=calibration)
            report["qat"] = {"epochs": int(qat_epochs), "run": run_dir, "map50": trained["map50"]}
        elif ptq:
            source, report["ptq"] = prepare_ptq(model, ptq, calibration_set)
            per_channel = report["ptq"]["per_channel"]
        content = convert(source, quant, calibration_set, io, sparse, postprocess=postprocess, per_channel=per_channel)
        if postprocess is None:
            runner = TFLiteRunner(content, model)
            report["check"] = {**compare(runner, source, images), "on": on}
            if family.checks_detections(model):
                report["check"].update(check_detections(runner, source, images, data, quant))
        else:
            content, missing = embed_detector_metadata(content, metadata_names(model, family))
            report["tflite_metadata"] = missing or "labels, input normalisation and outputs (MediaPipe ObjectDetector)"
            runner = DetectionRunner(content)
            # quantized: what an app shows (the detect default), not the order of the low-scoring boxes
            min_score = 0.0 if quant == "none" else 0.25
            report["check"] = {**compare_detections(runner, source, images, postprocess, min_score), "on": on}
            report["postprocess"] = dataclasses.asdict(postprocess)
        report["io_quantization"] = runner.io_quantization()
        metadata = decoder_metadata(model, family, report["io_quantization"], postprocess)
        report["metadata_file"] = str(out)[: -len(".tflite")] + ".json"
        write_json_atomic(report["metadata_file"], metadata)
        write_bytes_atomic(out, content)
        report["bytes"] = len(content)
        report["compatibility"] = compatibility(content, model)  # ops, versions, XNNPACK / GPU, sparsity warning
    else:
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=folder)
        try:
            with contextlib.redirect_stdout(StringIO()):  # Keras prints a signature listing
                model.export(tmp)
            loaded = tf.saved_model.load(tmp)  # kept alive: .serve refers to its variables
            expected = [o.numpy() for o in tf.nest.flatten(model(images, training=False))]
            got = [o.numpy() for o in tf.nest.flatten(loaded.serve(tf.constant(images)))]
            report["check"] = {"images": len(images), "on": on, **differences(expected, got)}
            _replace_dir(tmp, str(out))
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        report["bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
    return report


def export_model(model_path: str, out: str, format: str = "tflite", quant: str = "none", data: Optional[str] = None,
                 io: str = "float", sparse: bool = False, calibration: int = 100,
                 postprocess: Optional[PostprocessOptions] = None, qat_epochs: int = 0,
                 qat_options: Optional[dict] = None, ptq: Sequence[str] = ()) -> dict:
    """Load ``model_path`` (a ``.keras`` file) and :func:`export` it to ``out``.

    Returns:
        :func:`export`'s report with ``model`` (the path) first and ``keras_bytes`` (the size of
        ``model_path``) after ``out``, as ``kprune export`` prints it.

    Raises:
        ValueError: as :func:`export` (checked before the model is loaded), or a model that cannot be read.
    """
    check_options(out, format, quant, data, io, sparse, postprocess, qat_epochs, ptq)
    exported = export(load_model(model_path), out, format, quant, data, io, sparse, calibration,
                      postprocess=postprocess, qat_epochs=qat_epochs, qat_options=qat_options, ptq=ptq)
    head = {"model": str(model_path), **{k: exported[k] for k in ("format", "quant", "io", "sparse", "out")},
            "keras_bytes": os.path.getsize(model_path)}
    return {**head, **exported}


def summary(report: dict) -> str:
    """A few readable lines for the terminal."""
    check = report["check"]
    post = report.get("postprocess")
    kind = report["format"] + ("" if report["format"] != "tflite" else f" ({report['quant']}, io {report['io']}"
                                                                        f"{', sparse' if report['sparse'] else ''}"
                                                                        f"{', post-processed' if post else ''})")
    lines = [f"exported {report['model']} -> {report['out']}: {kind}, {report['bytes'] / 1e6:.2f} MB "
             f"(.keras {report['keras_bytes'] / 1e6:.2f} MB)"]
    if post:
        lines.append(f"decoding and per-class NMS inside the file (score >= {post['score_threshold']}, IoU "
                     f"{post['iou_threshold']}, at most {post['max_detections']}): outputs boxes (ymin, xmin, ymax, "
                     f"xmax), classes, scores, count")
        scoring = f" (scores >= {check['min_score']})" if check["min_score"] else ""
        lines.append(f"check on {check['images']} {check['on']} against kprune detect{scoring}: {check['file_detections']} "
                     f"detections for {check['detections']}, {check['unmatched']} unmatched; largest difference "
                     f"box {check['max_box_diff']:.3g}, score {check['max_score_diff']:.3g}")
    else:
        lines.append(f"check on {check['images']} {check['on']}: largest difference from Keras "
                     f"{check['max_abs_diff']:.4g} (mean {check['mean_abs_diff']:.3g}; outputs up to "
                     f"{check['max_abs_output']:.3g})")
        if check.get("detections"):
            found = check["detections"]
            scoring = f" (scores >= {found['min_score']})" if found["min_score"] else ""
            lines.append(f"detections against kprune detect's{scoring}: {found['file_detections']} for "
                         f"{found['detections']}, {found['unmatched']} "
                         f"unmatched; largest difference box {found['max_box_diff']:.3g}, score "
                         f"{found['max_score_diff']:.3g}")
        if check.get("map50"):
            scores = check["map50"]
            lines.append(f"mAP@0.5 on the first {scores['images']} {scores['split']} images: Keras "
                         f"{scores['keras']:.4f}, file {scores['file']:.4f}")
    if report.get("qat"):
        qat = report["qat"]
        lines.append(f"quantization-aware training: {qat['epochs']} epochs before the int8 conversion (QAT model "
                     f"mAP@0.5 {qat['map50']:.4f} in Keras; run in {qat['run']})")
    if report.get("ptq"):
        lines.append(f"post-training options: {', '.join(report['ptq']['options'])} (weights "
                     f"{'per channel' if report['ptq']['per_channel'] else 'per tensor'})")
    lines.extend(report.get("description", []))
    for name, q in report.get("io_quantization", {}).items():
        if q["scale"]:
            lines.append(f"{name}: {q['dtype']}, real = (q - {q['zero_point']}) * {q['scale']:.6g}")
    if report.get("tflite_metadata"):
        lines.append(f"metadata in the file: {report['tflite_metadata']}")
    if report.get("metadata_file"):
        lines.append(f"what a phone-side decoder needs (anchors, classes, input) -> {report['metadata_file']}")
    if report.get("compatibility"):
        lines.append(compatibility_text(report["compatibility"]))
    return "\n".join(lines)
