"""data_tools.jpeg: lossless metadata removal and frame size, on cv2 encodings with inserted segments."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from data_tools.jpeg import JpegError, jpeg_size, metadata_bytes, strip_metadata
from jpeg_fixtures import (
    COMMENT,
    EXIF_MAKE,
    ICC_TEXT,
    XMP_TEXT,
    app0_end,
    encode_jpeg,
    exif_segment,
    insert_after_app0,
    jpeg_with_metadata,
    metadata_segments,
    random_image,
    segment,
)

# APP14 Adobe: "Adobe", version 100, flags0, flags1, transform 1 (YCbCr, what cv2 encodes).
ADOBE = segment(0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 1]))


@pytest.fixture(scope="module")
def image():
    return random_image(37, 53)


@pytest.fixture(scope="module", params=[False, True], ids=["baseline", "progressive"])
def pair(request, image):
    return jpeg_with_metadata(image, progressive=request.param)


def decode(data: bytes) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels is not None
    return pixels


def test_fixture_exif_is_readable_by_pil(pair):
    with_meta, _ = pair
    with Image.open(io.BytesIO(with_meta)) as im:
        exif = im.getexif()
        assert exif[0x010F] == EXIF_MAKE
        assert exif[0x0112] == 1
        assert ICC_TEXT in im.info["icc_profile"]
        assert im.info["comment"] == COMMENT
        assert XMP_TEXT in im.info["xmp"].decode()


def test_strip_restores_cv2_bytes_exactly(pair):
    with_meta, plain = pair
    assert strip_metadata(with_meta) == plain
    assert strip_metadata(plain) == plain


def test_decoded_pixels_identical(pair):
    with_meta, plain = pair
    np.testing.assert_array_equal(decode(strip_metadata(with_meta)), decode(with_meta))
    np.testing.assert_array_equal(decode(strip_metadata(with_meta)), decode(plain))


def test_removed_bytes_equal_inserted_segments(pair):
    with_meta, plain = pair
    inserted = sum(len(s) for s in metadata_segments())
    assert metadata_bytes(with_meta) == inserted == len(with_meta) - len(plain)
    assert len(exif_segment()) == 60  # 4 (marker, length) + 6 (Exif\0\0) + 8 (header) + 30 (IFD0) + 12 (Make)
    assert metadata_bytes(plain) == 0


def test_pil_sees_no_metadata_after_strip(pair):
    stripped = strip_metadata(pair[0])
    with Image.open(io.BytesIO(stripped)) as im:
        assert len(im.getexif()) == 0
        for key in ("exif", "icc_profile", "comment", "xmp"):
            assert key not in im.info
        assert im.info["jfif_version"] == (1, 1)  # APP0 kept
    for text in (EXIF_MAKE.encode(), XMP_TEXT.encode(), b"http://ns.adobe.com/xap", ICC_TEXT, b"ICC_PROFILE",
                 COMMENT, b"Exif\0\0"):
        assert text not in stripped


def test_adobe_app14_is_kept(image):
    plain = encode_jpeg(image)
    data = insert_after_app0(plain, [metadata_segments()[0], ADOBE, *metadata_segments()[1:]])
    stripped = strip_metadata(data)
    assert stripped == insert_after_app0(plain, [ADOBE])
    np.testing.assert_array_equal(decode(stripped), decode(plain))


def test_other_app_segments_removed_app0_extension_kept(image):
    plain = encode_jpeg(image)
    jfxx = segment(0xE0, b"JFXX\0\x13" + bytes(10))  # APP0 extension, kept like the JFIF one
    others = [segment(marker, b"vendor data") for marker in (*range(0xE3, 0xEE), 0xEF)]
    data = insert_after_app0(plain, [jfxx, *others])
    assert strip_metadata(data) == insert_after_app0(plain, [jfxx])
    assert metadata_bytes(data) == sum(len(s) for s in others)


def test_fill_bytes_before_markers(pair):
    with_meta, plain = pair
    fill = b"\xff\xff\xff"
    # Fill bytes before every inserted segment and before the (kept) first DQT.
    data = insert_after_app0(plain, [fill + s for s in metadata_segments()] + [fill])
    assert fill + b"\xff\xdb" in data
    assert strip_metadata(data) == plain  # fill bytes before header markers are dropped
    assert jpeg_size(data) == (37, 53)
    assert metadata_bytes(data) == sum(len(s) for s in metadata_segments()) + 5 * len(fill)


def test_fill_bytes_after_first_scan_are_copied(image):
    plain = encode_jpeg(image)
    data = plain[:-2] + b"\xff\xff" + plain[-2:]  # fill before EOI belongs to the verbatim part
    assert strip_metadata(data) == data


def test_standalone_marker_before_scan_kept(image):
    plain = encode_jpeg(image)
    tem = b"\xff\x01"
    data = insert_after_app0(plain, [tem, exif_segment(), tem])
    assert strip_metadata(data) == insert_after_app0(plain, [tem, tem])


def test_trailing_data_after_eoi_dropped(pair):
    with_meta, plain = pair
    assert strip_metadata(with_meta + b"trailer\xff\xd9junk") == plain


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (1, 1), (8, 8), (17, 300), (480, 640)])
def test_jpeg_size_matches_image_shape(shape):
    with_meta, plain = jpeg_with_metadata(random_image(*shape))
    assert jpeg_size(with_meta) == shape
    assert jpeg_size(plain) == shape
    assert jpeg_size(encode_jpeg(random_image(*shape), progressive=True)) == shape


def test_jpeg_size_grayscale():
    gray = random_image(19, 23)[..., 0]
    assert jpeg_size(encode_jpeg(gray)) == (19, 23)


def test_jpeg_size_reads_only_the_header(pair):
    with_meta, _ = pair
    cut = with_meta[:-100]
    assert jpeg_size(cut) == (37, 53)
    with pytest.raises(JpegError, match="truncated"):
        strip_metadata(cut)


def test_truncated_in_header_segment(pair):
    with_meta, _ = pair
    with pytest.raises(JpegError, match="truncated") as info:
        strip_metadata(with_meta[:30])
    assert str(info.value) == "truncated: segment APP1 at byte 20 claims 58 bytes but only 8 remain"
    with pytest.raises(JpegError, match="truncated: segment APP1 at byte 20 ends inside its length field"):
        jpeg_size(with_meta[:23])
    with pytest.raises(JpegError, match="truncated: data ends at byte 20 before any scan"):
        jpeg_size(with_meta[:20])
    with pytest.raises(JpegError, match="truncated"):
        strip_metadata(with_meta[:21])


@pytest.mark.parametrize("keep", [-2, -1, 0.5, 0.9])
def test_truncated_in_scan_data(pair, keep):
    with_meta, _ = pair
    sos = with_meta.index(b"\xff\xda")  # cut points between the first SOS and EOI
    end = keep if isinstance(keep, int) else sos + int((len(with_meta) - sos) * keep)
    with pytest.raises(JpegError, match="truncated: no end-of-image marker after the scan data"):
        strip_metadata(with_meta[:end])


def test_png_is_not_a_jpeg(image):
    ok, png = cv2.imencode(".png", image)
    assert ok
    message = r"not a JPEG file \(starts with 89 50 4e 47, expected ff d8\)"
    with pytest.raises(JpegError, match=message):
        strip_metadata(png.tobytes())
    with pytest.raises(JpegError, match=message):
        jpeg_size(png.tobytes())


@pytest.mark.parametrize("data", [b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff"])
def test_empty_or_tiny_input_raises(data):
    with pytest.raises(JpegError):
        strip_metadata(data)
    with pytest.raises(JpegError):
        jpeg_size(data)


def test_no_frame_or_scan():
    tables_only = b"\xff\xd8" + segment(0xDB, bytes(65)) + b"\xff\xd9"
    with pytest.raises(JpegError, match="no frame header"):
        jpeg_size(tables_only)
    with pytest.raises(JpegError, match="before any scan"):
        strip_metadata(tables_only)


def test_corrupt_structure(image):
    plain = encode_jpeg(image)
    at = app0_end(plain)
    with pytest.raises(JpegError, match=f"expected a marker at byte {at}"):
        strip_metadata(plain[:at] + b"\x00" + plain[at:])
    with pytest.raises(JpegError, match="invalid length 1"):
        strip_metadata(plain[:at] + b"\xff\xe1\x00\x01" + plain[at:])


def test_jpeg_error_is_value_error():
    assert issubclass(JpegError, ValueError)
    with pytest.raises(ValueError):
        strip_metadata(b"GIF89a")
