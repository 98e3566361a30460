"""Darknet ``.weights`` files: read into a model, write from a model.

Layout: a header of int32 major, minor, revision, then ``seen`` (images seen in training) as int64
when major*10 + minor >= 2 (20 bytes in all) or int32 otherwise (16 bytes). Then, for every
convolutional layer in cfg order: biases[n]; if it has batch norm, scales[n], rolling_mean[n],
rolling_variance[n]; then weights[n][c][k][k] (Keras wants them as k, k, c, n). All float32,
little-endian. A file must end exactly after the last layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from kprune.darknet.builder import conv_layers_in_order
from kprune.fileio import write_bytes_atomic

_FLOAT = np.dtype("<f4")


class WeightsError(ValueError):
    """A .weights file that does not match the model; the message names the file and layer."""


@dataclass(frozen=True)
class WeightsHeader:
    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_is_int64(self) -> bool:
        return self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000

    @property
    def nbytes(self) -> int:
        return 20 if self.seen_is_int64 else 16

    def to_bytes(self) -> bytes:
        """The header's bytes.

        Raises:
            WeightsError: a value that does not fit its field.
        """
        limit = 2**63 if self.seen_is_int64 else 2**31
        if not 0 <= self.seen < limit or not all(-2**31 <= v < 2**31 for v in (self.major, self.minor, self.revision)):
            raise WeightsError(f"header {self.as_list()} does not fit a {self.nbytes}-byte Darknet header")
        head = np.array([self.major, self.minor, self.revision], dtype="<i4").tobytes()
        seen = np.array([self.seen], dtype="<i8" if self.seen_is_int64 else "<i4").tobytes()
        return head + seen

    def as_list(self) -> List[int]:
        return [self.major, self.minor, self.revision, self.seen]


def read_header(data: bytes, path: str = "<weights>") -> WeightsHeader:
    """Decode the header at the start of ``data``.

    Raises:
        WeightsError: fewer bytes than the header needs.
    """
    if len(data) < 12:
        raise WeightsError(f"{path}: {len(data)} bytes is too short for a Darknet header (16 or 20 bytes)")
    major, minor, revision = np.frombuffer(data[:12], dtype="<i4").tolist()
    header = WeightsHeader(major, minor, revision, 0)
    if len(data) < header.nbytes:
        raise WeightsError(f"{path}: {len(data)} bytes is too short for a {header.nbytes}-byte header")
    seen_type = "<i8" if header.seen_is_int64 else "<i4"
    seen = int(np.frombuffer(data[12: header.nbytes], dtype=seen_type)[0])
    return WeightsHeader(major, minor, revision, seen)


def _conv_parts(model, index: int, conv) -> List[Tuple[str, object, tuple]]:
    """(name, keras variable, darknet shape) in file order for one conv layer (and its batch norm)."""
    kernel = conv.kernel
    k_h, k_w, c_in, n = kernel.shape
    try:
        bn = model.get_layer(f"bn_{index}")
    except ValueError:
        bn = None
    if bn is not None:
        parts = [("biases", bn.beta, (n,)), ("scales", bn.gamma, (n,)),
                 ("rolling_mean", bn.moving_mean, (n,)), ("rolling_variance", bn.moving_variance, (n,))]
    else:
        if conv.bias is None:
            raise WeightsError(f"layer {conv.name} has neither a bias nor a batch norm bn_{index}")
        parts = [("biases", conv.bias, (n,))]
    parts.append(("weights", kernel, (n, c_in, k_h, k_w)))
    return parts


def load_weights(model, path: str | os.PathLike) -> WeightsHeader:
    """Load a Darknet .weights file into a model built from the matching cfg.

    Args:
        model: a model from :func:`kprune.darknet.builder.build_model`.
        path: the .weights file.

    Returns:
        The file's header, also stored in the model's detection heads (see :func:`set_model_header`)
        so that :func:`save_weights` writes it back.

    Raises:
        WeightsError: the file is missing, ends inside a layer, or has bytes left after the last
            layer (the message names the layer and the counts).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror}") from None
    header = read_header(data, path)
    body = data[header.nbytes:]
    if len(body) % 4:
        raise WeightsError(f"{path}: body of {len(body)} bytes is not a whole number of float32 values")
    values = np.frombuffer(body, dtype=_FLOAT)
    offset = 0
    assignments = []
    layers = conv_layers_in_order(model)
    for index, conv in layers:
        for part, variable, shape in _conv_parts(model, index, conv):
            count = int(np.prod(shape))
            if offset + count > values.size:
                raise WeightsError(
                    f"{path}: file ends in layer {conv.name} ({part}: needs {count} values, "
                    f"{values.size - offset} left); the weights are for a smaller model than the cfg"
                )
            array = values[offset: offset + count].reshape(shape)
            if part == "weights":
                array = array.transpose(2, 3, 1, 0)  # (n, c, kh, kw) -> (kh, kw, c, n)
            assignments.append((variable, array))
            offset += count
    if offset != values.size:
        raise WeightsError(
            f"{path}: {values.size - offset} values ({4 * (values.size - offset)} bytes) are left after the "
            f"last layer {layers[-1][1].name}; the weights are for a larger model than the cfg"
        )
    for variable, array in assignments:
        variable.assign(array)
    set_model_header(model, header)
    return header


def model_header(model) -> WeightsHeader:
    """The .weights header stored in the model's heads at conversion (Darknet's 0.2.0 otherwise)."""
    for layer in model.layers:
        header = getattr(layer, "darknet_header", None)
        if header:
            if len(header) != 4:
                raise WeightsError(f"layer {layer.name}: darknet_header {header} is not [major, minor, revision, seen]")
            return WeightsHeader(*header)
    return WeightsHeader()


def set_model_header(model, header: WeightsHeader) -> None:
    """Store ``header`` in every detection head of ``model`` so it is saved with the model."""
    for layer in model.layers:
        if hasattr(layer, "darknet_header"):
            layer.darknet_header = header.as_list()


def weights_bytes(model, header: WeightsHeader | None = None) -> bytes:
    """The content of the .weights file for ``model``.

    Raises:
        ValueError: the model has no Darknet conv layers.
    """
    header = model_header(model) if header is None else header
    chunks = [header.to_bytes()]
    for index, conv in conv_layers_in_order(model):
        for part, variable, _shape in _conv_parts(model, index, conv):
            array = np.asarray(variable.numpy(), dtype=_FLOAT)
            if part == "weights":
                array = array.transpose(3, 2, 0, 1)  # (kh, kw, c, n) -> (n, c, kh, kw)
            chunks.append(np.ascontiguousarray(array).tobytes())
    return b"".join(chunks)


def save_weights(model, path: str | os.PathLike, header: WeightsHeader | None = None) -> None:
    """Write the model's weights as a Darknet .weights file, atomically (temporary file, then rename).

    Args:
        model: a model with Darknet layer names (see :func:`build_model`).
        path: the output file.
        header: the header to write; by default the one stored in the model at conversion.

    Raises:
        ValueError: the model has no Darknet conv layers.
    """
    write_bytes_atomic(path, weights_bytes(model, header))

