"""Conversion between ``sensor_msgs/Image`` encodings and RGB arrays, without ROS.

The functions take the message's fields (``height, width, encoding, step, is_bigendian,
data``), not the message, so that they are unit-tested without rclpy and serve any
message-like object (rclpy messages, ``rosbags`` messages). Where ROS's ``cv_bridge`` is
installed the node may use it; this module is the project's own conversion elsewhere and
follows the same conventions:

* row padding: ``step`` may exceed ``width * bytes_per_pixel``; the padding is skipped;
* 16-bit data honours ``is_bigendian``;
* Bayer patterns are named by their top-left 2x2 block (``bayer_rggb8``: R G / G B);
* ``yuv422`` is UYVY byte order (the ROS convention), ``yuv422_yuy2`` is YUYV;
* 16-bit images become 8-bit by keeping the high byte (``value >> 8``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np


class ImageEncodingError(ValueError):
    """An image message cannot be converted: bad fields, bad size or unknown encoding."""


@dataclass(frozen=True)
class _EncodingInfo:
    channels: int  # values per pixel in the message
    bytes_per_channel: int  # 1 or 2
    # How to reach RGB from the (H, W, channels) array: a cv2 colour code or None (copy).
    cv2_code: Optional[int]


# Packed YUV 4:2:2 is stored as 2 bytes per pixel: convert with the (H, W, 2) array.
_ENCODINGS: dict[str, _EncodingInfo] = {
    "rgb8": _EncodingInfo(3, 1, None),
    "bgr8": _EncodingInfo(3, 1, cv2.COLOR_BGR2RGB),
    "rgba8": _EncodingInfo(4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": _EncodingInfo(4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": _EncodingInfo(1, 1, cv2.COLOR_GRAY2RGB),
    "8UC1": _EncodingInfo(1, 1, cv2.COLOR_GRAY2RGB),
    "mono16": _EncodingInfo(1, 2, cv2.COLOR_GRAY2RGB),
    "16UC1": _EncodingInfo(1, 2, cv2.COLOR_GRAY2RGB),
    "rgb16": _EncodingInfo(3, 2, None),
    "bgr16": _EncodingInfo(3, 2, cv2.COLOR_BGR2RGB),
    "rgba16": _EncodingInfo(4, 2, cv2.COLOR_RGBA2RGB),
    "bgra16": _EncodingInfo(4, 2, cv2.COLOR_BGRA2RGB),
    "yuv422": _EncodingInfo(2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": _EncodingInfo(2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _EncodingInfo(2, 1, cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": _EncodingInfo(2, 1, cv2.COLOR_YUV2RGB_YUY2),
    # OpenCV names a Bayer pattern by the 2x2 block starting at pixel (1, 1), ROS by the
    # block at (0, 0): ROS rggb is OpenCV's BG pattern, and so on.
    "bayer_rggb8": _EncodingInfo(1, 1, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": _EncodingInfo(1, 1, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": _EncodingInfo(1, 1, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": _EncodingInfo(1, 1, cv2.COLOR_BayerGB2RGB),
}

#: Encodings :func:`image_to_rgb` accepts.
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)


def bytes_per_pixel(encoding: str) -> int:
    """Bytes one pixel takes in a message of ``encoding``.

    Raises:
        ImageEncodingError: the encoding is not supported.
    """
    info = _encoding_info(encoding)
    return info.channels * info.bytes_per_channel


def _encoding_info(encoding: str) -> _EncodingInfo:
    info = _ENCODINGS.get(encoding)
    if info is None:
        raise ImageEncodingError(
            f"unsupported encoding '{_quoted(encoding)}' (supported: {', '.join(SUPPORTED_ENCODINGS)})"
        )
    return info


def image_to_rgb(
    height: int,
    width: int,
    encoding: str,
    step: int,
    is_bigendian: int | bool,
    data: Any,
    *,
    max_pixels: Optional[int] = None,
) -> np.ndarray:
    """Converts the fields of a ``sensor_msgs/Image`` to an RGB array.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        encoding: ROS image encoding (see :data:`SUPPORTED_ENCODINGS`).
        step: bytes per row in ``data`` (``>= width * bytes_per_pixel``; the rest is padding).
        is_bigendian: byte order of 16-bit values.
        data: the pixel bytes (``bytes``, ``array.array``, numpy array: anything exposing
            the buffer protocol).
        max_pixels: refuse images with more than this many pixels (before touching data).

    Returns:
        ``(height, width, 3)`` C-contiguous ``uint8`` RGB array. It may share memory with
        ``data`` when no conversion is needed (rgb8 without padding).

    Raises:
        ImageEncodingError: what is wrong with the fields, in words.
    """
    info = _encoding_info(encoding)
    if height <= 0 or width <= 0:
        raise ImageEncodingError(f"empty image: width {width}, height {height}")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageEncodingError(
            f"image {width}x{height} has {width * height} pixels, more than the limit "
            f"{max_pixels}"
        )
    if encoding.startswith("bayer_") and (height % 2 or width % 2 or height < 2 or width < 2):
        raise ImageEncodingError(f"{encoding} needs even width and height, got {width}x{height}")
    if info.channels == 2 and width % 2:
        raise ImageEncodingError(f"{encoding} needs an even width, got {width}")
    row_bytes = width * info.channels * info.bytes_per_channel
    if step < row_bytes:
        raise ImageEncodingError(
            f"step {step} is smaller than width x bytes per pixel = {width} x "
            f"{info.channels * info.bytes_per_channel} = {row_bytes} for {encoding}"
        )
    buffer = np.frombuffer(data, dtype=np.uint8)
    needed = step * height
    if buffer.size < needed:
        raise ImageEncodingError(
            f"data has {buffer.size} bytes, expected step x height = {step} x {height} = "
            f"{needed}"
        )
    rows = buffer[:needed].reshape(height, step)[:, :row_bytes]  # (H, row_bytes), a view

    if info.bytes_per_channel == 2:
        dtype = np.dtype(">u2" if is_bigendian else "<u2")
        # (H, W*C) 16-bit values; the high byte is the 8-bit value.
        values = np.ascontiguousarray(rows).view(dtype)
        pixels = (values >> 8).astype(np.uint8).reshape(height, width, info.channels)
    else:
        pixels = rows.reshape(height, width, info.channels)  # (H, W, C)

    if info.cv2_code is None:
        return np.ascontiguousarray(pixels)
    # cv2 wants contiguous input; a padded view is copied once here.
    source = np.ascontiguousarray(pixels)
    if info.channels == 1:
        source = source.reshape(height, width)
    return cv2.cvtColor(source, info.cv2_code)


def image_msg_to_rgb(msg: Any, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """:func:`image_to_rgb` for any object with ``sensor_msgs/Image`` fields."""
    return image_to_rgb(
        msg.height,
        msg.width,
        msg.encoding,
        msg.step,
        msg.is_bigendian,
        msg.data,
        max_pixels=max_pixels,
    )


def compressed_to_rgb(fmt: str, data: Any, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """Decodes a ``sensor_msgs/CompressedImage`` (jpeg or png) to an RGB array.

    Args:
        fmt: the message's ``format`` field (e.g. ``"jpeg"``, ``"rgb8; png compressed bgr8"``).
        data: the compressed bytes.
        max_pixels: refuse images with more than this many pixels.

    Raises:
        ImageEncodingError: unsupported format or undecodable data.
    """
    lowered = fmt.lower()
    if not any(name in lowered for name in ("jpeg", "jpg", "png")):
        raise ImageEncodingError(f"unsupported compressed format '{_quoted(fmt)}' (supported: jpeg, png)")
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageEncodingError(f"empty compressed data (format '{_quoted(fmt)}')")
    # Refused from the header, before decoding: a few kilobytes can claim gigapixels.
    width, height = compressed_size(memoryview(buffer).cast("B"))
    if max_pixels is not None and width * height > max_pixels:
        raise ImageEncodingError(
            f"image {width}x{height} has {width * height} pixels, more than the limit "
            f"{max_pixels}"
        )
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageEncodingError(f"cannot decode {buffer.size} bytes of '{_quoted(fmt)}' data")
    if bgr.shape[:2] != (height, width):
        raise ImageEncodingError(f"decoded image is {bgr.shape[1]}x{bgr.shape[0]}, its header says {width}x{height}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


#: Most scans a JPEG may have: baseline files have 1 (3 non-interleaved), common progressive
#: scripts about 10. Each scan is another pass over the whole image, so repeated scans are
#: a way to make one small message take seconds to decode.
MAX_JPEG_SCANS = 64

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_START_OF_SCAN, _END_OF_IMAGE = 0xDA, 0xD9


def _quoted(text: str, limit: int = 40) -> str:
    """A sender's string as it appears in a message: bounded, so logs stay small."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def compressed_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) of PNG or JPEG data, read from its headers (nothing is decoded).

    PNG's size is in its first chunk (IHDR). For JPEG the markers are walked over the whole
    file, skipping each segment by its length and each scan's entropy-coded data up to the
    next marker, so the frame header is found wherever it is; the scans are counted.

    Raises:
        ImageEncodingError: not PNG or JPEG, no frame size before the image data, or more
            than MAX_JPEG_SCANS scans.
    """
    data = bytes(data)
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageEncodingError("PNG data without its IHDR header: not decoded")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        raise ImageEncodingError("compressed data is neither PNG nor JPEG (no PNG signature or JPEG SOI marker)")
    size = None
    scans = 0
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise ImageEncodingError(f"JPEG data damaged at byte {offset} (no marker where one belongs): not decoded")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker == _END_OF_IMAGE:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        if length < 2:
            raise ImageEncodingError(f"JPEG segment at byte {offset} has length {length}: not decoded")
        if marker in _SOF_MARKERS and offset + 9 <= len(data) and size is None:
            height = int.from_bytes(data[offset + 5:offset + 7], "big")
            width = int.from_bytes(data[offset + 7:offset + 9], "big")
            size = (width, height)
        offset += 2 + length
        if marker == _START_OF_SCAN:
            if size is None:
                raise ImageEncodingError("JPEG scan before any frame header: not decoded")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageEncodingError(f"JPEG with more than {MAX_JPEG_SCANS} scans: not decoded")
            offset = _next_marker(data, offset)
    if size is None or min(size) == 0:
        raise ImageEncodingError("JPEG data without a frame size (SOF header): not decoded")
    return size


def _next_marker(data: bytes, offset: int) -> int:
    """Offset of the first marker after a scan's entropy-coded data (0xFF followed by
    anything but a stuffed 0x00 or a restart marker)."""
    while True:
        found = data.find(b"\xff", offset)
        if found < 0 or found + 1 >= len(data):
            return len(data)
        following = data[found + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            offset = found + 1 if following == 0xFF else found + 2
            continue
        return found


def rgb_to_image_fields(rgb: np.ndarray) -> tuple[int, int, str, int, bytes]:
    """Fields ``(height, width, "rgb8", step, data)`` of an unpadded rgb8 image.

    Raises:
        ImageEncodingError: ``rgb`` is not an ``(H, W, 3)`` uint8 array.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageEncodingError(
            f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}"
        )
    height, width = rgb.shape[:2]
    return height, width, "rgb8", width * 3, np.ascontiguousarray(rgb).tobytes()


def labels_to_image_fields(labels: np.ndarray) -> tuple[int, int, str, int, bytes]:
    """Fields of a label image: mono8 for uint8 labels, mono16 (little endian) otherwise.

    Raises:
        ImageEncodingError: ``labels`` is not a 2-D integer array.
    """
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ImageEncodingError(
            f"expected an (H, W) integer label array, got {labels.shape} {labels.dtype}"
        )
    height, width = labels.shape
    if labels.dtype == np.uint8:
        return height, width, "mono8", width, np.ascontiguousarray(labels).tobytes()
    return height, width, "mono16", width * 2, labels.astype("<u2").tobytes()
