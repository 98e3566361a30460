"""Running .tflite models with the LiteRT interpreter, the way a phone app does."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


class TFLiteRunner:
    """A TFLite model in the LiteRT interpreter that takes float images and returns float outputs
    in the order of the Keras model's outputs (matched by shape), quantizing at the edges as the
    file's input and output types require."""

    def __init__(self, content: bytes, model, threads: Optional[int] = None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"not a loadable TFLite model ({error})") from None
        (self.input,) = self.interpreter.get_input_details()
        expected = (1, *model.input_shape[1:])
        if tuple(self.input["shape"]) != expected:
            raise ValueError(f"TFLite input shape {tuple(self.input['shape'])}, the Keras model has {expected}")
        by_shape = {tuple(d["shape"][1:]): d for d in self.interpreter.get_output_details()}
        shapes = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
        wanted = [tuple(shape[1:]) for shape in shapes]
        if sorted(by_shape) != sorted(wanted):
            raise ValueError(f"TFLite outputs {sorted(by_shape)} do not match the Keras model's {wanted}")
        self.outputs = [by_shape[shape] for shape in wanted]

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

    def __call__(self, images: np.ndarray) -> List[np.ndarray]:
        """Raw outputs for a batch of float32 images, image by image."""
        outputs = [[] for _ in self.outputs]
        for image in np.asarray(images, np.float32):
            self.invoke(image[None])
            for k, detail in enumerate(self.outputs):
                outputs[k].append(self._dequantize(self.interpreter.get_tensor(detail["index"]), detail))
        return [np.concatenate(o, axis=0) for o in outputs]

    def io_quantization(self) -> Dict[str, dict]:
        """Input and output types with their scale and zero point (what an integer-io app applies)."""
        details = {"input": self.input, **{f"output_{k}": d for k, d in enumerate(self.outputs)}}
        return {name: {"dtype": np.dtype(d["dtype"]).name, "scale": float(d["quantization"][0]),
                       "zero_point": int(d["quantization"][1])} for name, d in details.items()}


def operators(content: bytes) -> List[dict]:
    """The ops of a TFLite flatbuffer's main graph in execution order, read from the file itself:
    ``op`` (the builtin name, or the custom op's name) and the numpy type names of its ``inputs``
    and ``outputs`` (optional inputs that are absent left out).

    Raises:
        ValueError: ``content`` is not a TFLite flatbuffer.
    """
    from ai_edge_litert import schema_py_generated as schema

    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    builtin = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    types = {code: name.lower() for name, code in vars(schema.TensorType).items() if not name.startswith("_")}
    model = schema.Model.GetRootAs(content, 0)
    graph = model.Subgraphs(0)

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
        ops.append({"op": op_name(model.OperatorCodes(op.OpcodeIndex())),
                    "inputs": tensor_types(op.InputsAsNumpy()), "outputs": tensor_types(op.OutputsAsNumpy())})
    return ops
