"""Round trips of tdnet_ros.image_encoding on every supported encoding (no ROS graph).

Expected values are built independently in this file: messages are packed with plain
numpy from a known RGB image, and colour conversions are checked against the textbook
formulas (BT.601 for YUV) or, for Bayer mosaics, against the image they were sampled from.
"""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest

from tdnet_ros.image_encoding import (
    SUPPORTED_ENCODINGS,
    ImageEncodingError,
    bytes_per_pixel,
    compressed_to_rgb,
    image_to_rgb,
    labels_to_image_fields,
    rgb_to_image_fields,
)

HEIGHT, WIDTH = 48, 64


def random_rgb(seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_rgb(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Slowly varying colours: demosaicing and chroma subsampling reproduce them closely."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 40 + 150 * x / width
    g = 200 - 120 * y / height
    b = 60 + 60 * (x + y) / (width + height)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def pad_rows(pixels: np.ndarray, padding: int) -> tuple[bytes, int]:
    """Packs (H, row_bytes) uint8 rows with `padding` junk bytes after each row."""
    height = pixels.shape[0]
    rows = pixels.reshape(height, -1)
    junk = np.full((height, padding), 0xAB, dtype=np.uint8)
    padded = np.concatenate([rows, junk], axis=1)
    return padded.tobytes(), padded.shape[1]


def packed(pixels: np.ndarray, padding: int = 0) -> dict:
    height, width = pixels.shape[:2]
    data, step = pad_rows(pixels.view(np.uint8).reshape(height, -1), padding)
    return dict(height=height, width=width, step=step, data=data)


# --- exact encodings -----------------------------------------------------------------

EXACT_8BIT = {
    "rgb8": lambda rgb: rgb,
    "bgr8": lambda rgb: rgb[..., ::-1],
    "rgba8": lambda rgb: np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1),
    "bgra8": lambda rgb: np.concatenate(
        [rgb[..., ::-1], np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1
    ),
}


@pytest.mark.parametrize("encoding", sorted(EXACT_8BIT))
@pytest.mark.parametrize("padding", [0, 13])
def test_colour_8bit_round_trip(encoding: str, padding: int) -> None:
    rgb = random_rgb()
    pixels = np.ascontiguousarray(EXACT_8BIT[encoding](rgb))
    fields = packed(pixels, padding)
    out = image_to_rgb(encoding=encoding, is_bigendian=0, **fields)
    assert out.dtype == np.uint8 and out.shape == (HEIGHT, WIDTH, 3)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("padding", [0, 5])
def test_mono8_is_grey_rgb(padding: int) -> None:
    grey = random_rgb()[..., 0].copy()
    out = image_to_rgb(encoding="mono8", is_bigendian=0, **packed(grey, padding))
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)


@pytest.mark.parametrize("bigendian", [0, 1])
@pytest.mark.parametrize("padding", [0, 6])
def test_mono16_keeps_high_byte(bigendian: int, padding: int) -> None:
    values = np.random.default_rng(3).integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    stored = values.astype(">u2" if bigendian else "<u2")
    out = image_to_rgb(encoding="mono16", is_bigendian=bigendian, **packed(stored, padding))
    expected = (values >> 8).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)


@pytest.mark.parametrize("encoding", ["rgb16", "bgr16"])
def test_colour_16bit(encoding: str) -> None:
    rgb = random_rgb(4)
    values = rgb.astype(np.uint16) * 257  # high byte == the 8-bit value
    if encoding == "bgr16":
        values = values[..., ::-1]
    out = image_to_rgb(encoding=encoding, is_bigendian=1, **packed(np.ascontiguousarray(values).astype(">u2"), 2))
    np.testing.assert_array_equal(out, rgb)


# --- YUV 4:2:2 -------------------------------------------------------------------------


def bt601_yuv(rgb: np.ndarray) -> np.ndarray:
    """Limited-range BT.601 Y, U, V of each pixel, float."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    return np.stack([y, u, v], -1)


def bt601_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    c, d, e = y - 16.0, u - 128.0, v - 128.0
    r = 1.164 * c + 1.596 * e
    g = 1.164 * c - 0.392 * d - 0.813 * e
    b = 1.164 * c + 2.017 * d
    return np.clip(np.stack([r, g, b], -1), 0, 255)


def pack_422(rgb: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    """Packs RGB into UYVY or YUYV bytes; returns (packed (H, 2W), expected RGB)."""
    yuv = bt601_yuv(rgb)
    y = np.clip(yuv[..., 0].round(), 0, 255)
    # One U and V per horizontal pixel pair: the pair's mean.
    u = np.clip(yuv[..., 1].reshape(HEIGHT, WIDTH // 2, 2).mean(-1).round(), 0, 255)
    v = np.clip(yuv[..., 2].reshape(HEIGHT, WIDTH // 2, 2).mean(-1).round(), 0, 255)
    y0, y1 = y[:, 0::2], y[:, 1::2]
    if order == "uyvy":
        quads = np.stack([u, y0, v, y1], -1)
    else:
        quads = np.stack([y0, u, y1, v], -1)
    data = quads.reshape(HEIGHT, 2 * WIDTH).astype(np.uint8)
    expected = bt601_rgb(y, np.repeat(u, 2, axis=1), np.repeat(v, 2, axis=1))
    return data, expected


@pytest.mark.parametrize(
    "encoding,order",
    [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"), ("yuyv", "yuyv")],
)
@pytest.mark.parametrize("padding", [0, 8])
def test_yuv422(encoding: str, order: str, padding: int) -> None:
    data, expected = pack_422(random_rgb(5), order)
    out = image_to_rgb(encoding=encoding, is_bigendian=0, **{**packed(data, padding), "width": WIDTH})
    assert out.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(out.astype(np.float64) - expected).max() <= 3.0


# --- Bayer -----------------------------------------------------------------------------

BAYER_CHANNELS = {  # channel index at (0,0), (0,1), (1,0), (1,1)
    "bayer_rggb8": (0, 1, 1, 2),
    "bayer_bggr8": (2, 1, 1, 0),
    "bayer_gbrg8": (1, 2, 0, 1),
    "bayer_grbg8": (1, 0, 2, 1),
}


def mosaic(rgb: np.ndarray, pattern: tuple[int, int, int, int]) -> np.ndarray:
    raw = np.empty(rgb.shape[:2], np.uint8)
    for index, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        raw[dy::2, dx::2] = rgb[dy::2, dx::2, pattern[index]]
    return raw


@pytest.mark.parametrize("encoding", sorted(BAYER_CHANNELS))
@pytest.mark.parametrize("padding", [0, 4])
def test_bayer_demosaics_to_the_sampled_image(encoding: str, padding: int) -> None:
    rgb = smooth_rgb()
    raw = mosaic(rgb, BAYER_CHANNELS[encoding])
    out = image_to_rgb(encoding=encoding, is_bigendian=0, **packed(raw, padding))
    inner = (slice(2, -2), slice(2, -2))  # borders are extrapolated
    error = np.abs(out[inner].astype(int) - rgb[inner].astype(int))
    # A wrong pattern swaps red and blue (errors ~100); a right one is off by a few levels.
    assert error.max() <= 6, f"{encoding}: max error {error.max()}"


# --- compressed ------------------------------------------------------------------------


def test_png_is_lossless() -> None:
    rgb = random_rgb(6)
    ok, png = cv2.imencode(".png", rgb[..., ::-1])
    assert ok
    np.testing.assert_array_equal(compressed_to_rgb("png", png.tobytes()), rgb)


def test_jpeg_decodes_close_to_source() -> None:
    rgb = smooth_rgb()
    ok, jpeg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    out = compressed_to_rgb("rgb8; jpeg compressed bgr8", jpeg.tobytes())
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 2.0


def test_compressed_errors_name_the_problem() -> None:
    with pytest.raises(ImageEncodingError, match="unsupported compressed format 'tiff'"):
        compressed_to_rgb("tiff", b"1234")
    with pytest.raises(ImageEncodingError, match="neither PNG nor JPEG"):
        compressed_to_rgb("jpeg", b"1234")
    with pytest.raises(ImageEncodingError, match="empty compressed data"):
        compressed_to_rgb("png", b"")


# --- data containers and errors --------------------------------------------------------


def test_accepts_array_array_and_zero_copy_rgb8() -> None:
    rgb = random_rgb(7)
    data = array.array("B", rgb.tobytes())  # what rclpy gives for uint8[]
    out = image_to_rgb(HEIGHT, WIDTH, "rgb8", WIDTH * 3, 0, data)
    np.testing.assert_array_equal(out, rgb)
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))


def test_every_supported_encoding_decodes() -> None:
    for encoding in SUPPORTED_ENCODINGS:
        step = WIDTH * bytes_per_pixel(encoding)
        out = image_to_rgb(HEIGHT, WIDTH, encoding, step, 0, bytes(step * HEIGHT))
        assert out.shape == (HEIGHT, WIDTH, 3), encoding


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(height=4, width=4, encoding="rgb8", step=12, data=bytes(47)),
         r"data has 47 bytes, expected step x height = 12 x 4 = 48"),
        (dict(height=4, width=4, encoding="rgb8", step=11, data=bytes(48)),
         r"step 11 is smaller than width x bytes per pixel = 4 x 3 = 12 for rgb8"),
        (dict(height=4, width=0, encoding="mono8", step=0, data=b""),
         r"empty image: width 0, height 4"),
        (dict(height=4, width=4, encoding="hsv8", step=12, data=bytes(48)),
         r"unsupported encoding 'hsv8' \(supported: rgb8, bgr8"),
        (dict(height=3, width=4, encoding="bayer_rggb8", step=4, data=bytes(12)),
         r"bayer_rggb8 needs even width and height, got 4x3"),
        (dict(height=2, width=3, encoding="yuv422", step=6, data=bytes(12)),
         r"yuv422 needs an even width, got 3"),
    ],
)
def test_bad_fields_raise_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ImageEncodingError, match=message):
        image_to_rgb(is_bigendian=0, **fields)


def test_max_pixels_refuses_before_reading_data() -> None:
    with pytest.raises(ImageEncodingError, match=r"image 8000x8000 has 64000000 pixels, more than the limit 1000000"):
        image_to_rgb(8000, 8000, "mono8", 8000, 0, b"", max_pixels=1_000_000)


def test_image_encoding_error_is_a_value_error() -> None:
    assert issubclass(ImageEncodingError, ValueError)


def test_output_fields() -> None:
    rgb = random_rgb(8)
    height, width, encoding, step, data = rgb_to_image_fields(rgb)
    assert (height, width, encoding, step) == (HEIGHT, WIDTH, "rgb8", WIDTH * 3)
    np.testing.assert_array_equal(image_to_rgb(height, width, encoding, step, 0, data), rgb)

    labels = np.arange(HEIGHT * WIDTH, dtype=np.uint16).reshape(HEIGHT, WIDTH) % 300
    height, width, encoding, step, data = labels_to_image_fields(labels)
    assert (encoding, step) == ("mono16", WIDTH * 2)
    np.testing.assert_array_equal(np.frombuffer(data, "<u2").reshape(HEIGHT, WIDTH), labels)
    assert labels_to_image_fields(labels.astype(np.uint8))[2] == "mono8"
    with pytest.raises(ImageEncodingError, match=r"expected an \(H, W, 3\) uint8 array"):
        rgb_to_image_fields(rgb[..., :2])


def test_compressed_size_from_headers() -> None:
    from tdnet_ros.image_encoding import compressed_size

    rgb = random_rgb(9, 37, 53)
    for extension in (".png", ".jpg"):
        ok, data = cv2.imencode(extension, rgb)
        assert ok
        assert compressed_size(data.tobytes()) == (53, 37), extension
    with pytest.raises(ImageEncodingError, match="neither PNG nor JPEG"):
        compressed_size(b"not an image")


def test_compressed_bomb_is_refused_from_its_header() -> None:
    ok, png = cv2.imencode(".png", random_rgb(10))
    assert ok
    data = bytearray(png.tobytes())
    data[16:20] = (8000).to_bytes(4, "big")  # IHDR width
    data[20:24] = (8000).to_bytes(4, "big")  # IHDR height
    with pytest.raises(ImageEncodingError, match="image 8000x8000 has 64000000 pixels, more than the limit 1000000"):
        compressed_to_rgb("png", bytes(data), max_pixels=1_000_000)
    ok, jpeg = cv2.imencode(".jpg", random_rgb(11))
    data = bytearray(jpeg.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 7] = (9000).to_bytes(2, "big")
    data[sof + 7:sof + 9] = (9000).to_bytes(2, "big")
    with pytest.raises(ImageEncodingError, match="image 9000x9000 has 81000000 pixels"):
        compressed_to_rgb("jpeg", bytes(data), max_pixels=1_000_000)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_same_as_cv_bridge_where_installed(encoding: str) -> None:
    cv_bridge = pytest.importorskip("cv_bridge", reason="cv_bridge exists only on ROS 2 installs")
    from sensor_msgs.msg import Image

    rgb = random_rgb(12)
    pixels = {
        "mono8": rgb[..., 1],
        "mono16": rgb[..., 1].astype(np.uint16) * 257,
    }.get(encoding)
    if pixels is None:
        pixels = np.ascontiguousarray(EXACT_8BIT[encoding](rgb))
    fields = packed(np.ascontiguousarray(pixels), 6)
    message = Image(height=fields["height"], width=fields["width"], encoding=encoding,
                    step=fields["step"], is_bigendian=0, data=fields["data"])
    expected = cv_bridge.CvBridge().imgmsg_to_cv2(message, desired_encoding="rgb8")
    np.testing.assert_array_equal(image_to_rgb(encoding=encoding, is_bigendian=0, **fields), expected)
