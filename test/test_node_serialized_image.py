"""Zero-copy reading of serialized sensor_msgs/Image (tdnet_ros.image_encoding),
checked against rclpy's own serialization of the same messages."""

from __future__ import annotations

import array

import numpy as np
import pytest

pytest.importorskip("rclpy")

from rclpy.serialization import serialize_message  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from tdnet_ros.image_encoding import SerializedImageError, parse_image  # noqa: E402


def image(frame_id: str, encoding: str, height: int, width: int, step: int, bigendian: int, seed: int) -> Image:
    message = Image(height=height, width=width, encoding=encoding, step=step, is_bigendian=bigendian)
    message.header.stamp.sec, message.header.stamp.nanosec = -5 + seed, 123456789 + seed
    message.header.frame_id = frame_id
    data = array.array("B")
    data.frombytes(np.random.default_rng(seed).integers(0, 256, step * height, dtype=np.uint8).tobytes())
    message.data = data
    return message


@pytest.mark.parametrize("frame_id", ["", "c", "cam", "camera", "a_longer_frame_id/x"])
@pytest.mark.parametrize("encoding", ["rgb8", "mono16", "bayer_rggb8", "yuv422_yuy2"])
def test_fields_and_data_match_rclpy_serialization(frame_id: str, encoding: str) -> None:
    for seed, (height, width, step, bigendian) in enumerate([(3, 5, 17, 0), (480, 640, 1920, 1), (1, 1, 3, 0)]):
        message = image(frame_id, encoding, height, width, step, bigendian, seed)
        parsed = parse_image(serialize_message(message))
        assert (parsed.sec, parsed.nanosec) == (message.header.stamp.sec, message.header.stamp.nanosec)
        assert parsed.frame_id == frame_id and parsed.encoding == encoding
        assert (parsed.height, parsed.width, parsed.step, parsed.is_bigendian) == (height, width, step, bigendian)
        assert bytes(parsed.data) == message.data.tobytes()


def test_data_is_a_view_not_a_copy() -> None:
    buffer = bytearray(serialize_message(image("cam", "rgb8", 4, 4, 12, 0, 1)))
    parsed = parse_image(buffer)
    buffer[-1] ^= 0xFF
    assert parsed.data[-1] == buffer[-1]


def test_truncated_and_malformed_buffers() -> None:
    raw = serialize_message(image("cam", "rgb8", 4, 4, 12, 0, 1))
    with pytest.raises(SerializedImageError, match="no CDR header"):
        parse_image(raw[:2])
    with pytest.raises(SerializedImageError, match="unknown CDR representation"):
        parse_image(b"\x05\x05" + raw[2:])
    with pytest.raises(SerializedImageError, match="truncated at field 'height'"):
        parse_image(raw[:4 + 8 + 4 + 4])
    # Data shorter than announced: what arrived is returned (the conversion reports it).
    assert len(parse_image(raw[:-10]).data) == 48 - 10


@pytest.mark.parametrize("frame_id", ["", "c", "ca", "cam", "camera", "front_camera_optical"])
@pytest.mark.parametrize("encoding", ["rgb8", "mono8", "mono16", "bgra8", "yuv422_yuy2"])
def test_serialized_images_deserialize_in_rclpy(frame_id: str, encoding: str) -> None:
    from rclpy.serialization import deserialize_message

    from tdnet_ros.image_encoding import serialize_image

    pixels = np.random.default_rng(3).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    raw = serialize_image(sec=-7, nanosec=999, frame_id=frame_id, height=7, width=5,
                          encoding=encoding, step=15, data=pixels)
    message = deserialize_message(raw, Image)
    assert (message.header.stamp.sec, message.header.stamp.nanosec) == (-7, 999)
    assert message.header.frame_id == frame_id and message.encoding == encoding
    assert (message.height, message.width, message.step, message.is_bigendian) == (7, 5, 15, 0)
    assert message.data.tobytes() == pixels.tobytes()
    parsed = parse_image(raw)
    assert (parsed.frame_id, parsed.encoding, parsed.step) == (frame_id, encoding, 15)
    assert bytes(parsed.data) == pixels.tobytes()
