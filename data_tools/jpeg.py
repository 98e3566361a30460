"""Lossless removal of metadata from JPEG files, by walking the marker segments (no re-encoding).

A JPEG file is a sequence of marker segments: ``ff <code>`` optionally followed by a big-endian
16-bit length (which counts itself) and a payload. The image itself is the entropy-coded data that
follows each SOS (start of scan) header, up to the EOI (end of image) marker. Metadata lives in
APPn and COM segments before the first scan, so it can be dropped without touching a single
compressed pixel:

* removed: APP1 (EXIF, XMP), APP2 (ICC profile, FPXR), APP3..APP13 (APP13: Photoshop/IPTC), APP15
  and COM;
* kept: APP0 (JFIF/JFXX, which decoders use for the file type), APP14 (Adobe: it selects the colour
  transform, so removing it can change the decoded colours) and every non-APP segment.
"""

from __future__ import annotations

from typing import Iterator, Tuple

__all__ = ["JpegError", "strip_metadata", "jpeg_size", "metadata_bytes"]

SOI = 0xD8
EOI = 0xD9
SOS = 0xDA
TEM = 0x01
APP0 = 0xE0
APP14 = 0xEE
COM = 0xFE
# Metadata segments: APP1..APP15 except APP14 (Adobe), plus comments.
METADATA_MARKERS = (frozenset(range(APP0 + 1, APP0 + 16)) - {APP14}) | {COM}
# SOF0..SOF15 share the 0xC0..0xCF range with DHT, JPG and DAC, which are not frame headers.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone (no length field): TEM and the restart markers RST0..RST7.
STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {TEM}

_NAMES = {0xC4: "DHT", 0xC8: "JPG", 0xCC: "DAC", SOI: "SOI", EOI: "EOI", SOS: "SOS", 0xDB: "DQT",
          0xDC: "DNL", 0xDD: "DRI", 0xDE: "DHP", 0xDF: "EXP", COM: "COM", TEM: "TEM"}


class JpegError(ValueError):
    """The data is not a JPEG file, or its marker structure is truncated or corrupt."""


def marker_name(marker: int) -> str:
    """Readable name of a marker code (the byte after ``ff``), for error messages."""
    if marker in _NAMES:
        return _NAMES[marker]
    if marker in SOF_MARKERS:
        return f"SOF{marker - 0xC0}"
    if 0xD0 <= marker <= 0xD7:
        return f"RST{marker - 0xD0}"
    if APP0 <= marker <= APP0 + 15:
        return f"APP{marker - APP0}"
    return f"marker 0x{marker:02x}"


def _scan_end(data: bytes, pos: int) -> int:
    """Offset of the first marker after the entropy-coded data starting at ``pos``.

    Inside entropy-coded data a 0xff byte is always followed by 0x00 (byte stuffing), by a restart
    marker RST0..RST7 (which belongs to the scan) or by fill bytes and a real marker.

    Returns:
        The offset of the ``ff`` immediately before the marker code (fill bytes stay in the scan).

    Raises:
        JpegError: the data ends before any marker, i.e. without an end-of-image marker.
    """
    n = len(data)
    while True:
        ff = data.find(b"\xff", pos)
        if ff < 0:
            break
        code = ff + 1
        while code < n and data[code] == 0xFF:
            code += 1
        if code >= n:
            break
        if data[code] != 0x00 and not 0xD0 <= data[code] <= 0xD7:
            return code - 1
        pos = code + 1
    raise JpegError("truncated: no end-of-image marker after the scan data")


def _segments(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """Walk the marker segments of a JPEG file, lazily.

    Fill bytes (extra 0xff) before a marker are skipped: ``start`` is the offset of the ``ff``
    directly before the marker code. Each SOS segment spans its header and the entropy-coded data
    after it, so the segments tile the file from the first SOS to the EOI. Being lazy, callers that
    only need the header (``jpeg_size``) never look at the scan data.

    Args:
        data: the complete file contents.

    Yields:
        ``(marker, start, end)`` of every segment from SOI to EOI (both included), ``data[start:end]``
        being the segment's bytes.

    Raises:
        TypeError: data is not bytes or bytearray.
        JpegError: not a JPEG file, or a segment is truncated or corrupt (raised when reached).
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if data[:2] != b"\xff\xd8":
        found = f"starts with {data[:4].hex(' ')}" if data else "empty data"
        raise JpegError(f"not a JPEG file ({found}, expected ff d8)")
    yield SOI, 0, 2
    n, pos, in_scans = len(data), 2, False
    while True:
        if pos >= n:
            if in_scans:
                raise JpegError("truncated: no end-of-image marker after the scan data")
            raise JpegError(f"truncated: data ends at byte {pos} before any scan (SOS)")
        if data[pos] != 0xFF:
            raise JpegError(f"corrupt: expected a marker at byte {pos}, found {data[pos]:02x}")
        while pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1
        if pos + 1 >= n:
            raise JpegError(f"truncated: data ends at byte {n} inside a marker")
        start, marker = pos, data[pos + 1]
        name = marker_name(marker)
        if marker == EOI or marker in STANDALONE_MARKERS:
            yield marker, start, start + 2
            if marker == EOI:
                return
            pos = start + 2
            continue
        if marker in (0x00, SOI):
            raise JpegError(f"corrupt: unexpected {name} at byte {start}")
        if start + 4 > n:
            raise JpegError(f"truncated: segment {name} at byte {start} ends inside its length field")
        length = int.from_bytes(data[start + 2:start + 4], "big")
        if length < 2:
            raise JpegError(f"corrupt: segment {name} at byte {start} has invalid length {length}")
        end = start + 2 + length
        if end > n:
            raise JpegError(f"truncated: segment {name} at byte {start} claims {length} bytes "
                            f"but only {n - start - 2} remain")
        if marker == SOS:
            in_scans = True
            end = _scan_end(data, end)
        yield marker, start, end
        pos = end


def strip_metadata(data: bytes) -> bytes:
    """Remove the metadata segments of a JPEG file without re-encoding it.

    Before the first scan, APP1..APP13, APP15 and COM segments are dropped and every other segment
    is copied (fill bytes between them are dropped too). Everything from the first SOS marker to
    the EOI marker (all scans, including tables between progressive scans) is copied verbatim;
    bytes after EOI (trailing data, e.g. appended thumbnails) are dropped.

    Args:
        data: the complete file contents.

    Returns:
        The JPEG without metadata; it decodes to exactly the same pixels.

    Raises:
        JpegError: not a JPEG file, truncated (including a missing EOI) or structurally corrupt.
    """
    parts = []
    scan_start = None
    for marker, start, end in _segments(data):
        if scan_start is not None:
            if marker == EOI:
                parts.append(data[scan_start:end])
                return b"".join(parts)
        elif marker == SOS:
            scan_start = start
        elif marker == EOI:
            raise JpegError(f"corrupt: end-of-image marker at byte {start} before any scan (SOS)")
        elif marker not in METADATA_MARKERS:
            parts.append(data[start:end])
    # _segments always ends with EOI or raises.
    raise AssertionError("unreachable")


def jpeg_size(data: bytes) -> Tuple[int, int]:
    """Image size from the SOFn frame header (raw pixel orientation: EXIF orientation is ignored).

    Only the header segments are read, so this also works on a file truncated in its scan data.

    Args:
        data: the complete file contents (at least up to the frame header).

    Returns:
        ``(height, width)`` in pixels.

    Raises:
        JpegError: not a JPEG file, no frame header before the first scan, a frame header that is
            too short, or a height of 0 (height defined later by a DNL marker, not supported).
    """
    for marker, start, end in _segments(data):
        if marker in SOF_MARKERS:
            # Payload: precision (1 byte), height (2), width (2), components...
            if end - start < 9:
                raise JpegError(f"corrupt: frame header {marker_name(marker)} at byte {start} is too short")
            height = int.from_bytes(data[start + 5:start + 7], "big")
            width = int.from_bytes(data[start + 7:start + 9], "big")
            if height == 0:
                raise JpegError(f"unsupported: frame header at byte {start} has height 0 (set by DNL)")
            return height, width
        if marker in (SOS, EOI):
            raise JpegError(f"corrupt: no frame header (SOFn) before {marker_name(marker)} at byte {start}")
    raise AssertionError("unreachable")


def metadata_bytes(data: bytes) -> int:
    """How many bytes ``strip_metadata`` would remove (metadata, fill bytes and trailing data).

    Raises:
        JpegError: as ``strip_metadata``.
    """
    return len(data) - len(strip_metadata(data))
