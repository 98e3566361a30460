"""Model metadata inside a post-processed ``.tflite``: labels, input normalisation, output meaning.

Phone-side detector APIs read a model's metadata from the file itself (the TFLite metadata
flatbuffer and its associated label file): MediaPipe's ObjectDetector needs the input's
normalisation and the labels there, and learns from it which of the four outputs of
``TFLite_Detection_PostProcess`` is which. The writer is MediaPipe's own
(``mediapipe.tasks.python.metadata.metadata_writers.object_detector``), the maintained successor of
the TFLite Support library's writers; ``tflite-support`` itself needs protobuf < 4 and cannot be
installed beside TensorFlow 2.21.

MediaPipe's pinned dependencies (protobuf < 5, absl-py ~= 2.3, opencv-contrib) clash with
TensorFlow's here, so ``make install`` installs the one release whose metadata writer works on its
own (:data:`WRITER_PACKAGE`, without its dependencies); later releases (1.x) ship the writer
without the native module it imports. Without it, an export still writes the JSON sidecar
(``OUT.json``) and says why the file has no metadata.

Only post-processed files get metadata: MediaPipe reads raw outputs only of SSD-style detectors
with its own anchor generator, and the YOLO heads' decoding is not among its options.
"""

from __future__ import annotations

import contextlib
import io
from typing import Optional, Sequence, Tuple

#: the release installed for its metadata writer (``pip install --no-deps``)
WRITER_PACKAGE = "mediapipe==0.10.21"


def _writers():
    """MediaPipe's ``object_detector`` and ``metadata_writer`` modules, or the reason they cannot be used."""
    try:
        # importing mediapipe loads its native framework bindings, which print a protobuf version
        # complaint to stderr with this TensorFlow's protobuf; the metadata writer does not use them
        with contextlib.redirect_stderr(io.StringIO()):
            from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer, object_detector
    except ImportError as error:
        return None, f"MediaPipe's metadata writer is not installed ({error}; `pip install --no-deps {WRITER_PACKAGE}`)"
    return (object_detector, metadata_writer), None


def embed_detector_metadata(content: bytes, names: Sequence[str]) -> Tuple[bytes, Optional[str]]:
    """``content`` (a post-processed detector, float input in 0..1) with MediaPipe ObjectDetector
    metadata: the input normalisation (pixel / 255: mean 0, std 255), the labels, the four outputs.

    Returns:
        (the file with metadata, None), or (``content`` unchanged, why not) when the writer is not
        installed.

    Raises:
        ValueError: the writer refuses the model (its message included).
    """
    writers, reason = _writers()
    if writers is None:
        return content, reason
    object_detector, metadata_writer = writers
    try:
        writer = object_detector.MetadataWriter.create_for_models_with_nms(
            bytearray(content), input_norm_mean=[0.0], input_norm_std=[255.0],
            labels=metadata_writer.Labels().add(list(names)))
        with_metadata, _ = writer.populate()
    except Exception as error:  # the writer raises several types; keep its message
        raise ValueError(f"writing the model metadata failed: {error}") from None
    return bytes(with_metadata), None


def read_labels(content: bytes) -> Optional[list]:
    """The labels stored in a file's metadata (its associated ``labels.txt``), or None."""
    import zipfile

    try:  # associated files are a zip archive appended to the flatbuffer
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = [n for n in archive.namelist() if n.endswith(".txt")]
            return archive.read(names[0]).decode().splitlines() if names else None
    except zipfile.BadZipFile:
        return None
