"""The image codec, without ROS: ``sensor_msgs/Image`` and ``CompressedImage`` to RGB
arrays (decode), and label maps and RGB arrays to image fields or serialized messages
(encode), with every size check in one place (:func:`check_size`).

Decoding takes the message's fields (``height, width, encoding, step, is_bigendian,
data``), a message-like object, or the serialized (CDR) bytes the node subscribes to.

The functions serve any message-like object (rclpy messages, ``rosbags`` messages) and
are unit-tested without rclpy. Where ROS's ``cv_bridge`` is installed the node may use it
for the pixels (``decode_image(..., convert=...)``), after the same checks; this module is
the project's own conversion elsewhere and follows the same conventions:

* row padding: ``step`` may exceed ``width * bytes_per_pixel``; the padding is skipped;
* 16-bit data honours ``is_bigendian``;
* Bayer patterns are named by their top-left 2x2 block (``bayer_rggb8``: R G / G B);
* ``yuv422`` is UYVY byte order (the ROS convention), ``yuv422_yuy2`` is YUYV;
* 16-bit images become 8-bit by keeping the high byte (``value >> 8``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional

import cv2
import numpy as np


class ImageEncodingError(ValueError):
    """An image message cannot be converted: bad fields, bad size or unknown encoding."""


@dataclass(frozen=True)
class ImageLimits:
    """Sizes a decoder accepts (the node's max_image_pixels and min_image_size)."""

    max_pixels: Optional[int] = None  # more pixels are refused, before any data is touched
    min_size: int = 1  # a smaller width or height is refused


def check_size(width: int, height: int, limits: ImageLimits = ImageLimits()) -> None:
    """The size checks of every decoder (raw, compressed, cv_bridge).

    Raises:
        ImageEncodingError: empty, more pixels than the limit, or smaller than the minimum.
    """
    if height <= 0 or width <= 0:
        raise ImageEncodingError(f"empty image: width {width}, height {height}")
    if limits.max_pixels is not None and height * width > limits.max_pixels:
        raise ImageEncodingError(
            f"image {width}x{height} has {width * height} pixels, more than the limit {limits.max_pixels}"
        )
    if min(height, width) < limits.min_size:
        raise ImageEncodingError(f"image {width}x{height} is smaller than min_image_size {limits.min_size}")


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
    check_size(width, height, ImageLimits(max_pixels))
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
    check_size(width, height, ImageLimits(max_pixels))
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


def rgb_to_image_fields(rgb: np.ndarray) -> tuple[int, int, str, int, np.ndarray]:
    """Fields ``(height, width, "rgb8", step, data)`` of an unpadded rgb8 image (``data``:
    the C-contiguous pixels, without a copy where they already are).

    Raises:
        ImageEncodingError: ``rgb`` is not an ``(H, W, 3)`` uint8 array.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageEncodingError(
            f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}"
        )
    height, width = rgb.shape[:2]
    return height, width, "rgb8", width * 3, np.ascontiguousarray(rgb)


def labels_to_image_fields(labels: np.ndarray) -> tuple[int, int, str, int, np.ndarray]:
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
        return height, width, "mono8", width, np.ascontiguousarray(labels)
    return height, width, "mono16", width * 2, np.ascontiguousarray(labels.astype("<u2", copy=False))


# -- serialized (CDR) sensor_msgs/Image ------------------------------------------------------
# Serialized (CDR) ``sensor_msgs/Image``: read without copying the pixels, written with one copy.
#
# rclpy's message conversion copies the pixel data twice each way (Python ``array`` <-> C
# message <-> CDR); for camera-sized images that is most of the node's own latency. The node
# subscribes to raw bytes and reads the fields here (``data`` stays a view into the received
# buffer), and publishes its image outputs as bytes built here. Pure Python (``struct`` +
# ``memoryview``), no rclpy import.
#
# Layout (XCDR1/XCDR2 plain, every field at most 4-byte aligned, so both are the same):
# encapsulation (4 bytes: 0x00, 0x00 big / 0x01 little endian (XCDR2: 0x06 / 0x07), 0, 0);
# then, aligned relative to the end of the encapsulation: ``int32 sec, uint32 nanosec,
# string frame_id, uint32 height, uint32 width, string encoding, uint8 is_bigendian,
# uint32 step, sequence<uint8> data`` (strings and sequences: uint32 length, then bytes;
# strings include their terminating NUL).


class SerializedImageError(ValueError):
    """The bytes are not a well-formed serialized sensor_msgs/Image."""


@dataclass(frozen=True)
class SerializedImage:
    sec: int
    nanosec: int
    frame_id: str
    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: memoryview  # view into the serialized buffer, no copy


_LITTLE_ENDIAN_IDS = {0x01, 0x03, 0x07, 0x09, 0x0B}
_BIG_ENDIAN_IDS = {0x00, 0x02, 0x06, 0x08, 0x0A}


def parse_image(buffer: bytes | bytearray | memoryview) -> SerializedImage:
    """Fields of a serialized ``sensor_msgs/Image``; ``data`` is a view into ``buffer``.

    Raises:
        SerializedImageError: truncated or malformed buffer (with what and where).
    """
    view = memoryview(buffer).cast("B")
    if len(view) < 4:
        raise SerializedImageError(f"serialized image of {len(view)} bytes has no CDR header")
    representation = view[1]
    if view[0] != 0 or representation not in _LITTLE_ENDIAN_IDS | _BIG_ENDIAN_IDS:
        raise SerializedImageError(f"unknown CDR representation {bytes(view[:2]).hex()}")
    order = "<" if representation in _LITTLE_ENDIAN_IDS else ">"
    body = view[4:]
    offset = 0

    def uint32(name: str) -> int:
        nonlocal offset
        offset = (offset + 3) & ~3
        if offset + 4 > len(body):
            raise SerializedImageError(f"serialized image truncated at field '{name}'")
        (value,) = struct.unpack_from(order + "I", body, offset)
        offset += 4
        return value

    def string(name: str) -> str:
        nonlocal offset
        length = uint32(name)
        if offset + length > len(body):
            raise SerializedImageError(f"serialized image truncated in string '{name}'")
        raw = bytes(body[offset:offset + length])
        offset += length
        return raw.rstrip(b"\0").decode("utf-8", errors="replace")

    sec = uint32("header.stamp.sec")
    if sec >= 2**31:
        sec -= 2**32  # int32
    nanosec = uint32("header.stamp.nanosec")
    frame_id = string("header.frame_id")
    height = uint32("height")
    width = uint32("width")
    encoding = string("encoding")
    if offset + 1 > len(body):
        raise SerializedImageError("serialized image truncated at field 'is_bigendian'")
    is_bigendian = body[offset]
    offset += 1
    step = uint32("step")
    length = uint32("data")
    # A sender may announce more data than it sent; keep what is there (the image
    # conversion then reports the shortfall with the expected size).
    data = body[offset:offset + length]
    return SerializedImage(sec, nanosec, frame_id, height, width, encoding, is_bigendian, step, data)


def _cdr_string(value: str, offset: int) -> tuple[bytes, int]:
    """A CDR string at ``offset`` (4-aligned): length with NUL, bytes, NUL; new offset."""
    raw = value.encode("utf-8") + b"\0"
    return struct.pack("<I", len(raw)) + raw, offset + 4 + len(raw)


def serialize_image(
    *, sec: int, nanosec: int, frame_id: str, height: int, width: int, encoding: str,
    step: int, data: Any, is_bigendian: int = 0,
) -> bytes:
    """Little-endian CDR bytes of a ``sensor_msgs/Image`` (publishable with rclpy as-is).

    Args:
        data: the pixel bytes (anything exposing the buffer protocol, e.g. a C-contiguous
            numpy array); copied once, into the returned bytes.
    """
    pixels = memoryview(data).cast("B")
    parts = [b"\x00\x01\x00\x00", struct.pack("<iI", sec, nanosec)]
    offset = 8  # body offset, for alignment
    chunk, offset = _cdr_string(frame_id, offset)
    parts.append(chunk)
    padding = -offset % 4
    parts.append(b"\0" * padding + struct.pack("<II", height, width))
    offset += padding + 8
    chunk, offset = _cdr_string(encoding, offset)
    parts.append(chunk)
    parts.append(struct.pack("<B", is_bigendian))
    offset += 1
    padding = -offset % 4
    parts.append(b"\0" * padding + struct.pack("<II", step, len(pixels)))
    parts.append(pixels)
    return b"".join(parts)


# -- the node's two directions -----------------------------------------------------------------


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, possibly a view of the message's buffer
    sec: int
    nanosec: int
    frame_id: str


def decode_image(
    message: Any, limits: ImageLimits = ImageLimits(), convert: Optional[Callable[[Any], np.ndarray]] = None
) -> DecodedImage:
    """A camera message as RGB with its stamp and frame_id.

    Args:
        message: serialized ``sensor_msgs/Image`` bytes (read without copying the pixels),
            a ``CompressedImage``-like object (has ``format``), or an ``Image``-like one.
        limits: sizes refused before decoding.
        convert: another converter for ``Image`` objects (e.g. cv_bridge's), called after
            the same checks; its failures become ImageEncodingError.

    Raises:
        ImageEncodingError, SerializedImageError (both ValueError): what is wrong, in words.
    """
    if isinstance(message, (bytes, bytearray, memoryview)):
        fields = parse_image(message)
        rgb = image_to_rgb(fields.height, fields.width, fields.encoding, fields.step, fields.is_bigendian,
                           fields.data, max_pixels=limits.max_pixels)
        stamp = (fields.sec, fields.nanosec, fields.frame_id)
    else:
        header = message.header
        stamp = (int(header.stamp.sec), int(header.stamp.nanosec), header.frame_id)
        if hasattr(message, "format"):
            rgb = compressed_to_rgb(message.format, message.data, max_pixels=limits.max_pixels)
        elif convert is None:
            rgb = image_msg_to_rgb(message, max_pixels=limits.max_pixels)
        else:
            check_size(message.width, message.height, ImageLimits(limits.max_pixels))
            if len(message.data) < message.step * message.height:
                raise ImageEncodingError(
                    f"data has {len(message.data)} bytes, expected step x height = {message.step} x "
                    f"{message.height} = {message.step * message.height}")
            try:
                rgb = np.ascontiguousarray(convert(message))
            except Exception as error:  # CvBridgeError, TypeError, cv2.error
                raise ImageEncodingError(
                    f"cv_bridge cannot convert '{_quoted(message.encoding)}': {str(error)[:200]}") from error
    check_size(rgb.shape[1], rgb.shape[0], limits)
    return DecodedImage(rgb, *stamp)


def encode_labels(labels: np.ndarray, *, sec: int, nanosec: int, frame_id: str) -> bytes:
    """A serialized label image: mono8 class ids, or mono16 (little endian) above 255."""
    height, width, encoding, step, data = labels_to_image_fields(labels)
    return serialize_image(sec=sec, nanosec=nanosec, frame_id=frame_id, height=height, width=width,
                           encoding=encoding, step=step, data=data)


def encode_rgb(rgb: np.ndarray, *, sec: int, nanosec: int, frame_id: str) -> bytes:
    """A serialized rgb8 image (built directly: one copy of the pixels, not three)."""
    height, width, encoding, step, data = rgb_to_image_fields(rgb)
    return serialize_image(sec=sec, nanosec=nanosec, frame_id=frame_id, height=height, width=width,
                           encoding=encoding, step=step, data=data)
