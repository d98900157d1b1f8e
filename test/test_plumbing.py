"""The node's frame plumbing without ROS: newest-frame slot, reset requests, per-camera
statistics, the image codec's two directions, and the renderer."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from tdnet_ros.classes import CLASS_COLORS
from tdnet_ros.frame_slot import FrameSlot
from tdnet_ros.image_encoding import (
    ImageEncodingError,
    ImageLimits,
    SerializedImageError,
    check_size,
    decode_image,
    encode_labels,
    encode_rgb,
    parse_image,
)
from tdnet_ros.masks import Renderer
from tdnet_ros.reset_rule import ResetRule
from tdnet_ros.stream_stats import MAX_PROBLEM_CHARS, MAX_PROBLEM_KINDS, StreamStatistics, percentiles


class FakeClock:
    """A settable clock (the statistics take their time source as an argument)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- slot -------------------------------------------------------------------------------------


def test_slot_keeps_the_newest_and_counts_what_it_replaced() -> None:
    slot: FrameSlot[int] = FrameSlot()
    assert slot.take() is None
    assert not slot.put(1)
    assert slot.put(2) and slot.put(3)
    assert slot.take() == 3 and slot.take() is None
    assert (slot.offered, slot.dropped) == (3, 2)


def test_slot_under_concurrent_producers_loses_nothing_it_does_not_count() -> None:
    slot: FrameSlot[int] = FrameSlot()
    taken = []

    def produce(base: int) -> None:
        for i in range(2000):
            slot.put(base + i)

    threads = [threading.Thread(target=produce, args=(k * 10_000,)) for k in range(3)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        item = slot.take()
        if item is not None:
            taken.append(item)
    for thread in threads:
        thread.join()
    last = slot.take()
    taken += [last] if last is not None else []
    assert slot.offered == 6000
    assert len(taken) + slot.dropped == 6000


# -- reset rule: requests ------------------------------------------------------------------------


def test_a_requested_reset_applies_to_the_next_frame_only() -> None:
    rule = ResetRule()
    assert rule.check(0, (10, 10), "cam") is None
    assert rule.check(100_000_000, (10, 10), "cam") is None
    rule.request()
    assert rule.check(200_000_000, (10, 10), "cam") == "reset requested"
    assert rule.check(300_000_000, (10, 10), "cam") is None
    assert rule.requested == 1 and sum(rule.counts.values()) == 0


# -- statistics ---------------------------------------------------------------------------------


def test_percentiles_are_numpys_and_nan_when_empty() -> None:
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentiles(samples) == {f"p{q}": float(np.percentile(samples, q)) for q in (50, 95, 99)}
    assert all(np.isnan(v) for v in percentiles([]).values())


def test_rates_latencies_and_silence_from_an_injected_clock() -> None:
    clock = FakeClock()
    stats = StreamStatistics(clock)
    for i in range(10):  # 10 frames over 2 s
        clock.now = 100.0 + 0.2 * i
        stats.received()
        stats.published({"node": float(i)}, ["labels"])
    clock.now = 102.0
    snapshot = stats.snapshot()
    assert snapshot.counters["frames_received"] == snapshot.counters["frames_processed"] == 10
    assert snapshot.input_rate_hz == pytest.approx(10 / 2.0)
    assert snapshot.latency_percentiles["node"]["p50"] == pytest.approx(4.5)
    assert snapshot.rendered == {"labels": 10}
    assert snapshot.silent_for_s == pytest.approx(0.2)
    clock.now = 110.0  # rates count the last RATE_WINDOW_S only
    assert stats.snapshot().input_rate_hz == 0.0


def test_problem_throttle_per_kind_bounded_and_clipped() -> None:
    clock = FakeClock()
    stats = StreamStatistics(clock)
    assert stats.problem("bad", "first", 5.0, counter="frames_invalid") == "first"
    assert stats.problem("bad", "second", 5.0, counter="frames_invalid") is None  # within the period
    assert stats.problem("other", "third", 5.0) == "third"  # another kind
    clock.now += 6.0
    assert stats.problem("bad", "fourth", 5.0, counter="frames_invalid") == "fourth"
    assert stats.counter("frames_invalid") == 3
    long = stats.problem("long", "x" * 10_000, 5.0)
    assert len(long) < MAX_PROBLEM_CHARS + 40 and "(10000 characters)" in long
    for kind in range(3 * MAX_PROBLEM_KINDS):  # any number of kinds: memory stays bounded
        stats.problem(f"kind {kind}", "text", 5.0)
    assert len(stats._last_logged) <= MAX_PROBLEM_KINDS


# -- codec ----------------------------------------------------------------------------------------


def test_labels_and_rgb_round_trip_through_the_serialized_form() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    message = encode_rgb(rgb, sec=12, nanosec=345, frame_id="cam")
    decoded = decode_image(message)
    np.testing.assert_array_equal(decoded.rgb, rgb)
    assert (decoded.sec, decoded.nanosec, decoded.frame_id) == (12, 345, "cam")
    labels = rng.integers(0, 300, (7, 9)).astype(np.uint16)
    fields = parse_image(encode_labels(labels, sec=1, nanosec=2, frame_id="f"))
    assert (fields.encoding, fields.step, fields.height, fields.width) == ("mono16", 18, 7, 9)
    np.testing.assert_array_equal(np.frombuffer(fields.data, "<u2").reshape(7, 9), labels)
    assert parse_image(encode_labels(labels.astype(np.uint8) % 19, sec=1, nanosec=2, frame_id="f")).encoding == "mono8"


class Msg:
    """A message-like object (what rosbags or rclpy hand over)."""

    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


def header(frame_id: str = "cam") -> Msg:
    return Msg(stamp=Msg(sec=3, nanosec=4), frame_id=frame_id)


def test_every_decoder_applies_the_same_size_limits() -> None:
    limits = ImageLimits(max_pixels=100, min_size=4)
    big = np.zeros((20, 20, 3), np.uint8)
    raw = encode_rgb(big, sec=0, nanosec=0, frame_id="")
    ok, jpeg = cv2.imencode(".jpg", big)
    compressed = Msg(header=header(), format="jpeg", data=jpeg.tobytes())
    image = Msg(header=header(), height=20, width=20, encoding="rgb8", step=60, is_bigendian=0, data=big.tobytes())
    calls = []
    for message, convert in ((raw, None), (compressed, None), (image, None), (image, lambda m: calls.append(m))):
        with pytest.raises(ImageEncodingError, match="400 pixels, more than the limit 100"):
            decode_image(message, limits, convert)
    assert not calls  # a converter (cv_bridge) never sees an image the checks refuse
    tiny = encode_rgb(np.zeros((3, 30, 3), np.uint8), sec=0, nanosec=0, frame_id="")
    with pytest.raises(ImageEncodingError, match="smaller than min_image_size 4"):
        decode_image(tiny, ImageLimits(min_size=4))
    with pytest.raises(ImageEncodingError, match="empty image"):
        check_size(0, 10)
    with pytest.raises(SerializedImageError):
        decode_image(b"\x00\x01\x00\x00" + b"\x00" * 5)


def test_a_converter_runs_after_the_checks_and_its_failures_are_encoding_errors() -> None:
    rgb = np.full((6, 8, 3), 7, np.uint8)
    image = Msg(header=header("left"), height=6, width=8, encoding="bgr8", step=24, is_bigendian=0,
                data=rgb.tobytes())
    decoded = decode_image(image, convert=lambda m: np.frombuffer(m.data, np.uint8).reshape(6, 8, 3)[..., ::-1])
    assert decoded.rgb.flags.c_contiguous and decoded.frame_id == "left" and (decoded.sec, decoded.nanosec) == (3, 4)

    def broken(message):
        raise TypeError("no such encoding")

    with pytest.raises(ImageEncodingError, match="cv_bridge cannot convert 'bgr8': no such encoding"):
        decode_image(image, convert=broken)
    short = Msg(header=header(), height=6, width=8, encoding="rgb8", step=24, is_bigendian=0, data=b"\0" * 10)
    with pytest.raises(ImageEncodingError, match="data has 10 bytes"):
        decode_image(short, convert=broken)


# -- renderer -------------------------------------------------------------------------------------


def test_renderer_colours_overlay_and_masks() -> None:
    renderer = Renderer(np.asarray(CLASS_COLORS, np.uint8), overlay_alpha=0.25)
    labels = np.zeros((4, 6), np.uint8)
    labels[1:3, 2:5] = 13  # car
    color = renderer.color(labels)
    assert color.shape == (4, 6, 3)
    assert tuple(color[2, 3]) == tuple(CLASS_COLORS[13]) and tuple(color[0, 0]) == tuple(CLASS_COLORS[0])
    camera = np.full((4, 6, 3), 200, np.uint8)
    blended = renderer.overlay(camera, color)
    expected = np.round(0.75 * 200 + 0.25 * np.asarray(CLASS_COLORS[13], float))
    np.testing.assert_allclose(blended[2, 3], expected, atol=1)
    renderer.overlay_alpha = 1.0  # a runtime parameter change
    np.testing.assert_array_equal(renderer.overlay(camera, color), color)
    regions = {region.class_id: region for region in renderer.masks(labels)}
    assert set(regions) == {0, 13}
    car = regions[13]
    assert (car.x, car.y, car.width, car.height, car.pixel_count) == (2, 1, 3, 2, 6)
    assert car.mask.min() == 255


def test_label_stats_run_widths() -> None:
    from tdnet_ros.data.label_stats import run_widths

    mask = np.zeros((8, 10), bool)
    mask[:, 2:4] = True  # a 2-px pole
    mask[0, 6:9] = True  # and a 3-px run on row 0 only
    assert run_widths(mask, row_step=4) == [2, 3, 2]
