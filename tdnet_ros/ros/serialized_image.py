"""Reads a serialized (CDR) ``sensor_msgs/Image`` without copying its pixels.

rclpy's normal deserialization copies the pixel data twice (into the C message, then into
a Python ``array``); for a 1280x720 rgb8 frame that is most of the node's own latency. The
node subscribes to raw bytes instead and reads the fields here; ``data`` stays a view into
the received buffer. Pure Python (``struct`` + ``memoryview``), no rclpy import.

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
