"""JPEG test data: cv2-encoded images with hand-built metadata segments inserted after APP0."""

from __future__ import annotations

import struct
from typing import List, Sequence, Tuple

import cv2
import numpy as np

# Marker strings the tests look for to prove a segment is gone.
EXIF_MAKE = "kprune-test"
XMP_TEXT = "kprune-xmp-creator"
ICC_TEXT = b"kprune-icc-profile"
COMMENT = b"kprune-test comment"


def segment(marker: int, payload: bytes) -> bytes:
    """One marker segment: ff, marker code, big-endian length (counting itself), payload."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def exif_segment() -> bytes:
    """APP1 EXIF: "Exif\\0\\0" + a little-endian TIFF with IFD0 = {Make: EXIF_MAKE, Orientation: 1}."""
    make = EXIF_MAKE.encode("ascii") + b"\0"
    entries = 2
    ifd_size = 2 + 12 * entries + 4  # entry count, 12-byte entries, next-IFD offset
    make_offset = 8 + ifd_size  # the ASCII value (> 4 bytes) follows IFD0
    tiff = b"II" + struct.pack("<HI", 42, 8)
    tiff += struct.pack("<H", entries)
    # Entries sorted by tag, as TIFF requires: tag, type (2 ASCII, 3 SHORT), count, value/offset.
    tiff += struct.pack("<HHII", 0x010F, 2, len(make), make_offset)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0)
    tiff += struct.pack("<I", 0)
    tiff += make
    return segment(0xE1, b"Exif\0\0" + tiff)


def xmp_segment() -> bytes:
    """APP1 XMP: the Adobe namespace signature and a small XMP packet."""
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
        f"<dc:creator>{XMP_TEXT}</dc:creator>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    )
    return segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + packet.encode("utf-8"))


def icc_segment(size: int = 300) -> bytes:
    """APP2 ICC_PROFILE chunk 1 of 1, holding an ICC-like header padded to ``size`` bytes."""
    header = struct.pack(">I", size) + b"none" + bytes([4, 0x20, 0, 0]) + b"mntrRGB XYZ "
    header += bytes(12) + b"acsp"  # creation date, then the profile file signature at byte 36
    profile = (header + ICC_TEXT).ljust(size, b"\0")
    return segment(0xE2, b"ICC_PROFILE\0" + bytes([1, 1]) + profile)


def metadata_segments() -> List[bytes]:
    """The segments ``jpeg_with_metadata`` inserts, in file order."""
    return [exif_segment(), xmp_segment(), icc_segment(), segment(0xFE, COMMENT)]


def app0_end(jpeg: bytes) -> int:
    """Offset just past the APP0 segment that directly follows SOI."""
    if jpeg[:4] != b"\xff\xd8\xff\xe0":
        raise ValueError(f"expected SOI + APP0, found {jpeg[:4].hex(' ')}")
    return 4 + int.from_bytes(jpeg[4:6], "big")


def insert_after_app0(jpeg: bytes, segments: Sequence[bytes]) -> bytes:
    """The JPEG with ``segments`` inserted right after its APP0 segment."""
    at = app0_end(jpeg)
    return jpeg[:at] + b"".join(segments) + jpeg[at:]


def encode_jpeg(image: np.ndarray, quality: int = 90, progressive: bool = False) -> bytes:
    """cv2 JPEG encoding of an RGB (or grayscale) uint8 image; holds only APP0 + standard segments."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # cv2 expects BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, buffer = cv2.imencode(".jpg", image, params)
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buffer.tobytes()


def jpeg_with_metadata(image: np.ndarray, quality: int = 90, progressive: bool = False) -> Tuple[bytes, bytes]:
    """Encode ``image`` (RGB uint8) and insert EXIF, XMP, ICC and COM segments after APP0.

    Returns:
        ``(with_metadata, without_metadata)``; ``without_metadata`` is exactly the cv2 encoding.
    """
    plain = encode_jpeg(image, quality, progressive)
    return insert_after_app0(plain, metadata_segments()), plain


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random RGB uint8 image (noise plus gradients, so the encoder has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-40, 41, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)
