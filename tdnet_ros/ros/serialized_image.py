"""Serialized (CDR) ``sensor_msgs/Image``: read without copying the pixels, written with one copy.

rclpy's message conversion copies the pixel data twice each way (Python ``array`` <-> C
message <-> CDR); for camera-sized images that is most of the node's own latency. The node
subscribes to raw bytes and reads the fields here (``data`` stays a view into the received
buffer), and publishes its image outputs as bytes built here. Pure Python (``struct`` +
``memoryview``), no rclpy import.

Layout (XCDR1/XCDR2 plain, every field at most 4-byte aligned, so both are the same):
encapsulation (4 bytes: 0x00, 0x00 big / 0x01 little endian (XCDR2: 0x06 / 0x07), 0, 0);
then, aligned relative to the end of the encapsulation: ``int32 sec, uint32 nanosec,
string frame_id, uint32 height, uint32 width, string encoding, uint8 is_bigendian,
uint32 step, sequence<uint8> data`` (strings and sequences: uint32 length, then bytes;
strings include their terminating NUL).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any


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
