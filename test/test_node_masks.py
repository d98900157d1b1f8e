"""Rendering of the node's colour, overlay and per-class mask outputs (tdnet_ros.masks)."""

from __future__ import annotations

import numpy as np
import pytest

from tdnet_ros.masks import class_regions, colorize, overlay

COLORS = np.random.default_rng(0).integers(0, 256, (19, 3), dtype=np.uint8)


def labels(seed: int = 1, shape=(60, 80), classes: int = 19) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, shape, dtype=np.uint8)


def test_colorize_paints_class_colours() -> None:
    ids = labels()
    np.testing.assert_array_equal(colorize(ids, COLORS), COLORS[ids])


def test_colorize_unknown_ids_are_black_and_uint16_labels_work() -> None:
    ids = labels()
    ids[0, :5] = 200
    out = colorize(ids, COLORS)
    assert (out[0, :5] == 0).all()
    wide = ids.astype(np.uint16)
    wide[1, 0] = 300
    out16 = colorize(wide, COLORS)
    assert (out16[1, 0] == 0).all()
    np.testing.assert_array_equal(out16[2:], COLORS[ids[2:]])


def test_overlay_blends_with_alpha() -> None:
    image = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    color = colorize(labels(), COLORS)
    for alpha in (0.0, 0.3, 1.0):
        expected = (1 - alpha) * image.astype(float) + alpha * color.astype(float)
        assert np.abs(overlay(image, color, alpha).astype(float) - expected).max() <= 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        overlay(image, color[:10], 0.5)


def test_class_regions_match_brute_force() -> None:
    ids = np.zeros((50, 70), np.uint8)
    ids[10:20, 30:35] = 3  # a block
    ids[40, 5] = 7  # one pixel
    ids[0, 0] = ids[49, 69] = 11  # two far corners
    ids[25, 25] = 200  # void, ignored with num_classes
    regions = {r.class_id: r for r in class_regions(ids, num_classes=19)}
    assert sorted(regions) == [0, 3, 7, 11]
    for class_id, region in regions.items():
        ys, xs = np.nonzero(ids == class_id)
        assert region.pixel_count == len(ys)
        assert (region.x, region.y) == (xs.min(), ys.min())
        assert (region.width, region.height) == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        crop = ids[region.y:region.y + region.height, region.x:region.x + region.width]
        np.testing.assert_array_equal(region.mask, np.where(crop == class_id, 255, 0))
    assert regions[3].mask.shape == (10, 5) and (regions[3].mask == 255).all()
    assert regions[11].mask.shape == (50, 70) and regions[11].pixel_count == 2
    assert 200 in {r.class_id for r in class_regions(ids)}


def test_label_image_is_mono16_above_255_classes() -> None:
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image

    from tdnet_ros.image_encoding import encode_labels

    wide = np.arange(12, dtype=np.uint16).reshape(3, 4) * 40  # ids up to 440
    message = deserialize_message(encode_labels(wide, sec=0, nanosec=0, frame_id="f"), Image)
    assert (message.encoding, message.step, message.height, message.width) == ("mono16", 8, 3, 4)
    assert message.is_bigendian == 0 and message.header.frame_id == "f"
    np.testing.assert_array_equal(np.frombuffer(message.data, "<u2").reshape(3, 4), wide)
    narrow = deserialize_message(encode_labels((wide % 200).astype(np.uint8), sec=0, nanosec=0, frame_id=""), Image)
    assert (narrow.encoding, narrow.step) == ("mono8", 4)
    np.testing.assert_array_equal(np.frombuffer(narrow.data, np.uint8).reshape(3, 4), wide % 200)
