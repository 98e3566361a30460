"""Phone-ready TFLite: decoding and non-maximum suppression inside the file.

``kprune export --postprocess`` ends the graph in TFLite's ``TFLite_Detection_PostProcess`` custom
op, the op TensorFlow's object-detection exports end in and that phone-side detector APIs
(MediaPipe's ObjectDetector, the TFLite Task Library) expect. The file then gives four outputs:

- ``detection_boxes`` (1, N, 4): (ymin, xmin, ymax, xmax) normalised to the network input;
- ``detection_classes`` (1, N): class indices (0 = the first class; float, as the op writes them);
- ``detection_scores`` (1, N);
- ``num_detections`` (1,): how many of the N rows are detections.

The family puts its raw outputs into the op's terms (:meth:`~kprune.detectors.base.DetectorFamily.detection_op_inputs`):
YOLO heads do their grid and anchor arithmetic in the graph and hand the op boxes it only has to
copy (anchors (0, 0, 1, 1), unit scales); SSD hands the op its offsets and default boxes and the op
decodes them. The op runs per-class NMS (``use_regular_nms``), as :func:`kprune.models.head.non_max_suppression`
does, keeping ``max_detections`` in all and at most 100 per class (the op's own limit: the converter
does not pass a ``detections_per_class`` attribute on).

TensorFlow has no kernel for the op: the graph holds a function annotated to *implement* it
(``experimental_implements``), which the converter replaces by the custom op; its body is never run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kprune._keras import tf
from kprune.boxes import iou_matrix
from kprune.detectors import family_of
from kprune.detectors.inference import decode_and_suppress
from kprune.export.selective import quantize_keeping_float
from kprune.models.litert import DETECTION_OP, DETECTION_OUTPUTS


#: the name scope of the ops between the model's outputs and the op
SCOPE = "postprocess"


@dataclass(frozen=True)
class PostprocessOptions:
    """The op's settings, fixed in the file.

    Attributes:
        score_threshold: boxes scoring below it are dropped. The default keeps what mAP needs
            (0.001); an app filters by its own threshold on top (MediaPipe's ``score_threshold``).
        iou_threshold: NMS overlap threshold (that of ``kprune detect`` and ``kprune evaluate``).
        max_detections: rows of the outputs (and detections kept per class).
    """
    score_threshold: float = 0.001
    iou_threshold: float = 0.45
    max_detections: int = 100

    def __post_init__(self):
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score threshold {self.score_threshold}: must be in [0, 1]")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"IoU threshold {self.iou_threshold}: must be in (0, 1] (the op refuses 0)")
        if int(self.max_detections) != self.max_detections or self.max_detections < 1:
            raise ValueError(f"max detections {self.max_detections}: must be a whole number, at least 1")


def _implements(options: PostprocessOptions, classes: int, scales) -> str:
    """The op's attributes in the form ``experimental_implements`` takes (a NameAttrList in text)."""
    attributes = {"max_detections": ("i", int(options.max_detections)),
                  "max_classes_per_detection": ("i", 1),
                  "use_regular_nms": ("b", "true"),
                  "nms_score_threshold": ("f", float(options.score_threshold)),
                  "nms_iou_threshold": ("f", float(options.iou_threshold)),
                  "y_scale": ("f", float(scales[0])), "x_scale": ("f", float(scales[1])),
                  "h_scale": ("f", float(scales[2])), "w_scale": ("f", float(scales[3])),
                  "num_classes": ("i", int(classes))}
    text = [f'name: "{DETECTION_OP}"']
    for key, (kind, value) in attributes.items():
        value = repr(value) if kind == "f" else value
        text.append(f'attr {{ key: "{key}" value {{ {kind}: {value} }} }}')
    return " ".join(text)


def postprocess_function(model, options: PostprocessOptions = PostprocessOptions()):
    """``model`` followed by its family's preparation and the detection post-processing op, as a
    concrete function of one float image (1, H, W, 3) returning the op's four outputs by their names
    (:data:`~kprune.models.litert.DETECTION_OUTPUTS`: boxes, classes, scores, count).

    Raises:
        ValueError: the model's family cannot export with the op.
    """
    family = family_of(model)
    classes = family.num_classes(model)
    spec = tf.TensorSpec([1, *model.input_shape[1:]], tf.float32, name="images")

    @tf.function(input_signature=[spec])
    def detect(images):
        outputs = tf.nest.flatten(model(images, training=False))
        with tf.name_scope(SCOPE):  # names the ops an int8 conversion keeps in float
            try:
                inputs = family.detection_op_inputs(model, outputs)
            except NotImplementedError as error:
                raise ValueError(str(error)) from None

        @tf.function(experimental_implements=_implements(options, classes, inputs.scales))
        def detection_post_process(encodings, scores, anchors):
            # never run: the converter replaces this function by the op; the shapes are the op's
            rows = options.max_detections
            return (tf.zeros([1, rows, 4], name=DETECTION_OUTPUTS[0]), tf.zeros([1, rows], name=DETECTION_OUTPUTS[1]),
                    tf.zeros([1, rows], name=DETECTION_OUTPUTS[2]), tf.zeros([1], name=DETECTION_OUTPUTS[3]))

        results = detection_post_process(inputs.encodings, inputs.scores,
                                         tf.constant(np.asarray(inputs.anchors, np.float32)))
        # named outputs (the file's signature keys); their order in the graph is set after the
        # conversion, which orders them its own way (outputs_in_op_order)
        return dict(zip(DETECTION_OUTPUTS, results))

    return detect.get_concrete_function()


def quantize_keeping_postprocess_float(converter, representative) -> bytes:
    """Full-integer quantization of a post-processed model's network with the decoding before the op
    kept in float.

    Quantized, the decoding loses what matters most to mAP: the op needs box centres (0..1) and log
    sizes (-10..2) in one tensor, which int8 gives one scale (a step of about 0.05, 2 % of a box's
    size), and the class scores of every box share one too. Kept float, the post-processed int8
    file scores the mAP of the plain int8 file decoded in float. TensorFlow's selective
    quantization (:func:`kprune.export.selective.quantize_keeping_float`) leaves the ops of
    :data:`SCOPE` in float; the network is int8 up to a DEQUANTIZE after each head.

    Args:
        converter: a ``TFLiteConverter`` set up for int8 (representative dataset, int8 and float
            builtin ops, custom ops allowed).
        representative: the calibration generator.
    """
    return quantize_keeping_float(converter, representative, [SCOPE])


def outputs_in_op_order(content: bytes) -> bytes:
    """``content`` with the main graph's outputs in the op's order (boxes, classes, scores, count).

    The converter orders a function's outputs its own way (count first, here); phone-side APIs read
    the four outputs by position, so they are put back in the op's order.

    Raises:
        ValueError: the file has no detection post-processing op.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    graph = model.subgraphs[0]
    ops = [op for op in graph.operators
           if (model.operatorCodes[op.opcodeIndex].customCode or b"").decode() == DETECTION_OP]
    if len(ops) != 1:
        raise ValueError(f"expected one {DETECTION_OP} op in the converted model, found {len(ops)}")
    if list(graph.outputs) == list(ops[0].outputs):
        return content
    graph.outputs = np.asarray(ops[0].outputs, np.int32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def compare_detections(runner, model, images: np.ndarray, options: PostprocessOptions = PostprocessOptions(),
                       min_score: float = 0.0, predict=None) -> dict:
    """A post-processed file's detections (a :class:`~kprune.models.litert.DetectionRunner`) against
    those of ``kprune detect``'s path (the family's decoding, then
    :func:`~kprune.models.head.non_max_suppression` with the same thresholds) on ``images``.

    Each detection of the file is paired with an unpaired one of Keras of the same class that it
    overlaps by IoU >= 0.5, the closest in box; boxes of equal score may come in either order.

    Args:
        min_score: compare only detections scoring at least this on either side (a quantized file
            differs from float Keras in the order of its many low-scoring boxes, not in what an app shows).
        predict: raw outputs of the images instead of the Keras model's (e.g. those of the same
            network converted without post-processing, to check the post-processing alone).

    Returns:
        ``images``; ``min_score``; ``detections`` (Keras) and ``file_detections``; ``unmatched``
        (detections of either side without a partner); ``max_box_diff`` and ``max_score_diff`` over
        the pairs (normalised coordinates).
    """
    outputs = predict(images) if predict is not None else model(images, training=False)
    expected = decode_and_suppress(model, outputs, max(options.score_threshold, min_score), options.iou_threshold,
                                   options.max_detections)
    got = [tuple(part[scores >= min_score] for part in (boxes, scores, classes))
           for boxes, scores, classes in runner(images)]
    report = {"images": int(len(images)), "min_score": float(min_score), "detections": 0, "file_detections": 0,
              "unmatched": 0, "max_box_diff": 0.0, "max_score_diff": 0.0}
    for (boxes, scores, classes), (want_boxes, want_scores, want_classes) in zip(got, expected):
        report["detections"] += len(want_boxes)
        report["file_detections"] += len(boxes)
        free = np.ones(len(want_boxes), bool)
        overlaps = iou_matrix(boxes, want_boxes) if len(boxes) and len(want_boxes) else None
        for k, (box, score, cls) in enumerate(zip(boxes, scores, classes)):
            candidates = np.flatnonzero(free & (want_classes == cls))
            candidates = candidates[overlaps[k, candidates] >= 0.5] if overlaps is not None else candidates
            if not len(candidates):
                continue
            distance = np.abs(want_boxes[candidates] - box).max(axis=1)
            best = candidates[int(np.argmin(distance))]
            free[best] = False
            report["max_box_diff"] = max(report["max_box_diff"], float(distance.min()))
            report["max_score_diff"] = max(report["max_score_diff"], float(abs(want_scores[best] - score)))
        report["unmatched"] += int(free.sum()) + (len(boxes) - int((~free).sum()))
    return report
