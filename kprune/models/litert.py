"""Running .tflite models with the LiteRT interpreter, the way a phone app does."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


class _LoadedModel:
    """A flatbuffer loaded in the LiteRT interpreter, with one float image input quantized at the
    edge as the file's input type requires."""

    def __init__(self, content: bytes, threads: Optional[int] = None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"not a loadable TFLite model ({error})") from None
        (self.input,) = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    @staticmethod
    def _quantize(values: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        if not scale:
            return values.astype(detail["dtype"])
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(values / scale + zero), info.min, info.max).astype(detail["dtype"])

    @staticmethod
    def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        return (values.astype(np.float32) - zero) * scale if scale else values.astype(np.float32)

    def invoke(self, image: np.ndarray) -> None:
        """Run one image ``(1, h, w, 3)`` float32 (for timing: no output copies)."""
        self.interpreter.set_tensor(self.input["index"], self._quantize(image, self.input))
        self.interpreter.invoke()

    def io_quantization(self) -> Dict[str, dict]:
        """Input and output types with their scale and zero point (what an integer-io app applies)."""
        details = {"input": self.input, **{f"output_{k}": d for k, d in enumerate(self.outputs)}}
        return {name: {"dtype": np.dtype(d["dtype"]).name, "scale": float(d["quantization"][0]),
                       "zero_point": int(d["quantization"][1])} for name, d in details.items()}


class TFLiteRunner(_LoadedModel):
    """A TFLite model in the LiteRT interpreter that takes float images and returns float outputs
    in the order of the Keras model's outputs (matched by name, else by shape), quantizing at the edges as the
    file's input and output types require."""

    def __init__(self, content: bytes, model, threads: Optional[int] = None):
        super().__init__(content, threads)
        expected = (1, *model.input_shape[1:])
        if tuple(self.input["shape"]) != expected:
            raise ValueError(f"TFLite input shape {tuple(self.input['shape'])}, the Keras model has {expected}")
        shapes = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
        wanted = [tuple(shape[1:]) for shape in shapes]
        # the converter names a Keras model's outputs in the file's signature; files without (or of
        # another model) are matched by shape, which needs the shapes to differ
        signatures = self.interpreter._get_full_signature_list()
        named = next(iter(signatures.values()))["outputs"] if len(signatures) == 1 else {}
        by_index = {d["index"]: d for d in self.outputs}
        if set(model.output_names) <= set(named) and len(named) == len(self.outputs):
            found = [by_index[named[name]] for name in model.output_names]
        else:
            by_shape = {tuple(d["shape"][1:]): d for d in self.outputs}
            if sorted(by_shape) != sorted(wanted) or len(by_shape) != len(self.outputs):
                raise ValueError(f"TFLite outputs {sorted(by_shape)} do not match the Keras model's {wanted}")
            found = [by_shape[shape] for shape in wanted]
        if [tuple(d["shape"][1:]) for d in found] != wanted:
            raise ValueError(f"TFLite outputs {[tuple(d['shape'][1:]) for d in found]} do not match the Keras "
                             f"model's {wanted}")
        self.outputs = found

    def __call__(self, images: np.ndarray) -> List[np.ndarray]:
        """Raw outputs for a batch of float32 images, image by image."""
        outputs = [[] for _ in self.outputs]
        for image in np.asarray(images, np.float32):
            self.invoke(image[None])
            for k, detail in enumerate(self.outputs):
                outputs[k].append(self._dequantize(self.interpreter.get_tensor(detail["index"]), detail))
        return [np.concatenate(o, axis=0) for o in outputs]


def flatbuffer_graph(content: bytes) -> tuple:
    """A TFLite flatbuffer read in place: (the generated schema module, the model, its main graph).

    Raises:
        ValueError: ``content`` is not a TFLite flatbuffer.
    """
    from ai_edge_litert import schema_py_generated as schema

    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    model = schema.Model.GetRootAs(content, 0)
    return schema, model, model.Subgraphs(0)


def operators(content: bytes, versions: bool = False) -> List[dict]:
    """The ops of a TFLite flatbuffer's main graph in execution order, read from the file itself:
    ``op`` (the builtin name, or the custom op's name) and the numpy type names of its ``inputs``
    and ``outputs`` (optional inputs that are absent left out); with ``versions``, also ``version``,
    the op's kernel version as the file asks for it (a runtime must implement that version).

    Raises:
        ValueError: ``content`` is not a TFLite flatbuffer.
    """
    schema, model, graph = flatbuffer_graph(content)
    builtin = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    types = {code: name.lower() for name, code in vars(schema.TensorType).items() if not name.startswith("_")}

    def op_name(code) -> str:
        if code.CustomCode():
            return code.CustomCode().decode()
        # builtin codes above 127 live in BuiltinCode(); older files only fill the deprecated byte
        return builtin[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]

    def tensor_types(indices) -> List[str]:
        return [types[graph.Tensors(int(i)).Type()] for i in indices if i >= 0]

    ops = []
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = model.OperatorCodes(op.OpcodeIndex())
        ops.append({"op": op_name(code), "inputs": tensor_types(op.InputsAsNumpy()),
                    "outputs": tensor_types(op.OutputsAsNumpy())})
        if versions:
            ops[-1]["version"] = int(code.Version())
    return ops


def delegated_ops(content: bytes, threads: int = 1) -> List[bool]:
    """Which ops of a flatbuffer's main graph (in :func:`operators`' order) the LiteRT interpreter's
    default delegate (XNNPACK on CPU) takes; the others run in the builtin kernels.

    Read from the interpreter after it applied the delegate: each delegate node lists the tensors
    that enter and leave its partition, and an op belongs to a partition when it produces one of
    the partition's outputs or a tensor that a delegated op consumes without it entering the
    partition from outside (walked from the last op back, consumers before producers).

    Raises:
        ValueError: ``content`` cannot be loaded.
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=content, num_threads=threads)
        interpreter.allocate_tensors()  # the default delegate is applied here
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"not a loadable TFLite model ({error})") from None
    wrapper = interpreter._interpreter  # node names, inputs and outputs after delegation
    nodes = []
    for k in range(wrapper.NumNodes()):
        nodes.append((wrapper.NodeName(k), {int(t) for t in wrapper.NodeInputs(k) if t >= 0},
                      {int(t) for t in wrapper.NodeOutputs(k) if t >= 0}))
    # the interpreter appends its delegate nodes after the file's ops
    delegates = [node for node in nodes if node[0] == "DELEGATE"]
    original = [node for node in nodes if node[0] != "DELEGATE"]
    entering = set().union(*(node[1] for node in delegates))
    leaving = set().union(*(node[2] for node in delegates))
    taken, inside = [False] * len(original), set()
    for k in reversed(range(len(original))):
        _, inputs, outputs = original[k]
        taken[k] = bool(outputs & leaving) or bool((outputs & inside) - entering)
        if taken[k]:
            inside |= inputs
    return taken


#: the custom op that ends a post-processed (phone-ready) export, and the names of its outputs
DETECTION_OP = "TFLite_Detection_PostProcess"
DETECTION_OUTPUTS = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")


def detection_op_options(content: bytes) -> Optional[dict]:
    """The settings of the ``TFLite_Detection_PostProcess`` op in a flatbuffer (its custom options,
    a FlexBuffer map: ``max_detections``, ``nms_score_threshold``, ...), or None when the file has
    no such op.

    Raises:
        ValueError: ``content`` is not a TFLite flatbuffer.
    """
    from flatbuffers import flexbuffers

    _, model, graph = flatbuffer_graph(content)
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = model.OperatorCodes(op.OpcodeIndex())
        if code.CustomCode() and code.CustomCode().decode() == DETECTION_OP:
            return dict(flexbuffers.Loads(op.CustomOptionsAsNumpy().tobytes()))
    return None


class DetectionRunner(_LoadedModel):
    """A post-processed TFLite detector (one ending in ``TFLite_Detection_PostProcess``) in the
    LiteRT interpreter: float images in, detections out, as a phone app runs it.

    Attributes:
        options: the op's settings (:func:`detection_op_options`).
        input_size: (height, width) of the input.
    """

    def __init__(self, content: bytes, threads: Optional[int] = None):
        self.options = detection_op_options(content)
        if self.options is None:
            raise ValueError(f"the model has no {DETECTION_OP} op: export it with --postprocess")
        super().__init__(content, threads)
        self.input_size = tuple(int(v) for v in self.input["shape"][1:3])
        shapes = [tuple(d["shape"]) for d in self.outputs]
        rows = shapes[0][1] if shapes and len(shapes[0]) == 3 else None
        if shapes != [(1, rows, 4), (1, rows), (1, rows), (1,)]:
            raise ValueError(f"a post-processed model has the outputs boxes (1, N, 4), classes (1, N), scores (1, N) "
                             f"and count (1,) in this order; this one has {shapes}")

    def __call__(self, images: np.ndarray) -> List[tuple]:
        """Detections of each image of a float32 batch: (boxes (K, 4) as (x_min, y_min, x_max, y_max)
        normalised to the input, scores (K,), classes (K,) int64), best first, as
        :func:`kprune.models.head.non_max_suppression` returns them."""
        results = []
        for image in np.asarray(images, np.float32):
            self.invoke(image[None])
            boxes, classes, scores, count = (self.interpreter.get_tensor(d["index"]) for d in self.outputs)
            n = int(count[0])
            results.append((boxes[0, :n][:, [1, 0, 3, 2]].astype(np.float32), scores[0, :n].astype(np.float32),
                            classes[0, :n].astype(np.int64)))
        return results
