"""One camera of the segmentation node: its newest-frame slot, outputs, counters, diagnostics."""

from __future__ import annotations

import array
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.qos import ReliabilityPolicy
from builtin_interfaces.msg import Time
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import Header

from tdnet_ros.image_encoding import (
    ImageEncodingError,
    compressed_to_rgb,
    image_msg_to_rgb,
    image_to_rgb,
)
from tdnet_ros.masks import class_regions, color_lut, colorize, overlay
from tdnet_ros.preprocess import check_frame
from tdnet_ros.reset_rule import ResetRule, ResetSettings
from tdnet_ros.ros.serialized_image import SerializedImageError, parse_image, serialize_image

if TYPE_CHECKING:
    from tdnet_ros.ros.node import SegmenterNode

#: Frames kept for the latency percentiles in diagnostics.
LATENCY_WINDOW = 300
#: Longest problem text kept or logged (error messages may quote what a sender sent).
MAX_PROBLEM_CHARS = 300
#: Kinds of error whose last log time is remembered (for the throttle), per camera.
MAX_ERROR_KINDS = 64

LOST_HINT = (
    "best-effort subscriptions lose camera-sized images whose fragments do not all arrive "
    "(Fast DDS's default transports): publish the camera reliable (qos_reliability auto follows "
    "it), or start the camera and this node with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA "
    "(launch argument large_data:=true)"
)


def reliability_name(policy: Any) -> str:
    return "reliable" if policy == ReliabilityPolicy.RELIABLE else "best_effort"


def silence_message(topic: str, *, silent_for: float, received: int, lost: int, publishers: int,
                    publisher_kinds: list[str], subscribed: str, incompatible_policy: str,
                    transports: str) -> str:
    """Why a camera's diagnostics say no images arrive: the cause as exactly as it is known.

    Tells apart a camera that stopped sending (images arrived before) from one whose images
    never arrived (no publisher seen, incompatible QoS, lost in transport, or nothing at all).
    """
    if received:
        text = f"camera stopped sending: no images on {topic} for {silent_for:.1f} s after {received} received"
        return text + ("; its publisher is gone" if not publishers else "")
    if not publishers:
        return (
            f"no images received on {topic} yet, and no publisher seen: check the topic name, "
            f"ROS_DOMAIN_ID, and that the camera uses the same Fast DDS transports as this node "
            f"(FASTDDS_BUILTIN_TRANSPORTS={transports or 'unset'} here): participants with "
            "different transport settings may not discover each other"
        )
    who = f"{publishers} publisher(s) ({', '.join(publisher_kinds) or 'QoS unknown'})"
    if incompatible_policy:
        return (f"no images received on {topic} yet: {who} offer QoS incompatible with this node's "
                f"{subscribed} subscription (policy {incompatible_policy}); set qos_reliability auto "
                "or match the publisher")
    if lost:
        return f"no images received on {topic} yet: {who}, {lost} image(s) lost in transport: {LOST_HINT}"
    return (f"no images received on {topic} yet although {who} exist and match this node's {subscribed} "
            "subscription: the camera may not be publishing, or its images may not fit its transport "
            f"({LOST_HINT})")


@dataclass
class FrameJob:
    """A received message waiting for the worker."""

    msg: Any
    received_ns: int  # time.monotonic_ns() at reception
    wall_received_ns: int  # time.time_ns() at reception


@dataclass
class PreparedFrame:
    """A decoded frame on its way to the segmenter."""

    job: FrameJob
    rgb: np.ndarray  # (H, W, 3) uint8
    header: Header
    stamp_ns: int
    wanted: dict[str, bool]  # output -> somebody subscribes to it
    start_ns: int  # time.monotonic_ns() when the worker took the frame
    decoded_ns: int


def output_namespaces(topics: list[str], output_namespace: str) -> list[str]:
    """Where each camera's outputs go: ``<topic's namespace>/<output_namespace>``.

    ``/front/image_raw`` gives ``/front/segmentation``; a ``/compressed`` suffix is ignored.
    Cameras that would share a namespace get their topic's last name appended.
    """

    def parent(topic: str) -> str:
        if topic.endswith("/compressed"):
            topic = topic[: -len("/compressed")]
        return topic.rsplit("/", 1)[0]

    def base(topic: str) -> str:
        if topic.endswith("/compressed"):
            topic = topic[: -len("/compressed")]
        return topic.rsplit("/", 1)[1]

    first = [f"{parent(t)}/{output_namespace}" for t in topics]
    return [
        f"{ns}/{base(t)}" if first.count(ns) > 1 else ns for t, ns in zip(topics, first)
    ]


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _percentiles(values: Any) -> tuple[float, float, float]:
    data = np.fromiter(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"),) * 3  # type: ignore[return-value]
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return float(p50), float(p95), float(p99)


class CameraStream:
    """State of one camera. ``offer`` runs in the executor thread, the rest in the worker."""

    def __init__(self, *, topic: str, output_namespace: str, node: "SegmenterNode") -> None:
        self.topic = topic
        self.output_namespace = output_namespace
        self.node = node
        self.subscription: Any = None
        self.reliability = ""  # of the current subscription: reliable | best_effort
        self.publisher_reliabilities: list[Any] = []  # of the publishers last seen (auto mode)
        self.incompatible_policy = ""  # QoS policy a publisher was last found incompatible on
        self.reset_service: Any = None
        self._lock = threading.Lock()
        self._pending: Optional[FrameJob] = None
        self._reset_requested = False
        # Counters (cumulative).
        self.received = 0
        self.processed = 0
        self.dropped = 0  # replaced while waiting for the model
        self.lost = 0  # lost in transport (DDS message-lost events)
        self.invalid = 0  # bad input, refused
        self.errors = 0  # failures while processing a valid frame
        self.non_finite = 0  # frames whose model output held NaN or infinity (not published)
        self.skipped_idle = 0  # no subscriber to any output
        self.resets = 0
        self.rendered = {"labels": 0, "color": 0, "overlay": 0, "masks": 0, "timing": 0}
        self.last_error = ""
        self._error_logged_at: dict[str, float] = {}
        # Temporal state of the stream: when its cache must start afresh.
        self._reset_rule = ResetRule()
        # Windows for diagnostics.
        self._latencies: dict[str, deque] = {}
        self._received_times: deque = deque(maxlen=1000)
        self._published_times: deque = deque(maxlen=1000)
        self._last_received_monotonic: Optional[float] = None
        self._started = time.monotonic()
        self._lut: Optional[np.ndarray] = None

    # --- executor thread ---------------------------------------------------------------

    def offer(self, job: FrameJob) -> None:
        """Makes ``job`` the camera's pending frame; a frame still waiting is dropped."""
        with self._lock:
            self.received += 1
            self._received_times.append(time.monotonic())
            self._last_received_monotonic = time.monotonic()
            if self._pending is not None:
                self.dropped += 1
            self._pending = job

    def count_lost(self, count: int) -> None:
        """Counts messages the middleware reports lost in transport (best effort)."""
        with self._lock:
            self.lost += int(count)
        self.report_error("lost", f"{count} message(s) lost in transport (total {self.lost}): {LOST_HINT}",
                          count=False)

    def count_non_finite(self) -> None:
        with self._lock:
            self.non_finite += 1

    def request_reset(self) -> None:
        with self._lock:
            self._reset_requested = True

    # --- worker thread -----------------------------------------------------------------

    def take(self) -> Optional[FrameJob]:
        with self._lock:
            job, self._pending = self._pending, None
            return job

    def create_outputs(self, output_qos: Any, latched_qos: Any) -> None:
        node, ns, msgs = self.node, self.output_namespace, self.node.msgs
        self.pub_labels = node.create_publisher(Image, f"{ns}/labels", output_qos)
        self.pub_color = node.create_publisher(Image, f"{ns}/color", output_qos)
        self.pub_overlay = node.create_publisher(Image, f"{ns}/overlay", output_qos)
        self.pub_masks = node.create_publisher(msgs.ClassMasks, f"{ns}/masks", output_qos)
        self.pub_timing = node.create_publisher(msgs.SegmentationTiming, f"{ns}/timing", output_qos)
        self.pub_class_table = node.create_publisher(msgs.ClassTable, f"{ns}/class_table", latched_qos)

    def publish_class_table(
        self, msgs: Any, names: list[str], colors: np.ndarray, model: str, checkpoint: str
    ) -> None:
        table = msgs.ClassTable()
        table.header.stamp = self.node.get_clock().now().to_msg()
        table.model = model
        table.checkpoint = checkpoint
        for class_id, (name, color) in enumerate(zip(names, colors)):
            table.classes.append(
                msgs.ClassInfo(id=class_id, name=name, color=[int(c) for c in color])
            )
        self.pub_class_table.publish(table)

    def report_error(self, kind: str, problem: str, *, count: bool = True) -> None:
        """Counts a bad frame and logs it, at most once per period per ``kind``."""
        now = time.monotonic()
        if len(problem) > MAX_PROBLEM_CHARS:  # the sender's strings stay out of logs and memory
            problem = problem[:MAX_PROBLEM_CHARS] + f"... ({len(problem)} characters)"
        with self._lock:
            if count and kind == "processing":
                self.errors += 1
            elif count:
                self.invalid += 1
            self.last_error = problem
            last = self._error_logged_at.get(kind)
            period = self.node.config.error_log_period_s
            if last is not None and now - last < period:
                return
            if len(self._error_logged_at) >= MAX_ERROR_KINDS:  # bounded, whatever arrives
                self._error_logged_at.clear()
            self._error_logged_at[kind] = now
        self.node.get_logger().error(f"topic '{self.topic}': {problem}")

    def _decode(self, msg: Any) -> tuple[np.ndarray, Header]:
        """The message's RGB frame and header (``msg``: serialized Image bytes or a message)."""
        config = self.node.config
        if isinstance(msg, (bytes, bytearray, memoryview)):
            fields = parse_image(msg)
            header = Header(stamp=Time(sec=fields.sec, nanosec=fields.nanosec), frame_id=fields.frame_id)
            rgb = image_to_rgb(
                fields.height, fields.width, fields.encoding, fields.step, fields.is_bigendian,
                fields.data, max_pixels=config.max_image_pixels,
            )
        elif isinstance(msg, Image):
            header = msg.header
            if self.node.cv_bridge is None:
                rgb = image_msg_to_rgb(msg, max_pixels=config.max_image_pixels)
            else:
                rgb = self._convert_with_cv_bridge(msg)
        else:
            header = msg.header
            rgb = compressed_to_rgb(msg.format, msg.data, max_pixels=config.max_image_pixels)
        height, width = rgb.shape[:2]
        if min(height, width) < config.min_image_size:
            raise ImageEncodingError(
                f"image {width}x{height} is smaller than min_image_size "
                f"{config.min_image_size}"
            )
        return rgb, header

    def _convert_with_cv_bridge(self, msg: Image) -> np.ndarray:
        """cv_bridge's conversion, after the same size checks as the project's own."""
        limit = self.node.config.max_image_pixels
        if msg.height * msg.width > limit:
            raise ImageEncodingError(
                f"image {msg.width}x{msg.height} has {msg.width * msg.height} pixels, more than "
                f"the limit {limit}"
            )
        if msg.height == 0 or msg.width == 0:
            raise ImageEncodingError(f"empty image: width {msg.width}, height {msg.height}")
        if len(msg.data) < msg.step * msg.height:
            raise ImageEncodingError(
                f"data has {len(msg.data)} bytes, expected step x height = {msg.step} x "
                f"{msg.height} = {msg.step * msg.height}"
            )
        try:
            rgb = self.node.cv_bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")
        except Exception as error:  # CvBridgeError, TypeError, cv2.error
            raise ImageEncodingError(f"cv_bridge cannot convert '{msg.encoding[:40]}': {str(error)[:200]}") from error
        return np.ascontiguousarray(rgb)

    def _reset_reason(self, stamp_ns: int, size: tuple[int, int], frame_id: str) -> Optional[str]:
        with self._lock:
            requested, self._reset_requested = self._reset_requested, False
        config = self.node.config
        self._reset_rule.settings = ResetSettings(
            period_factor=config.reset_period_factor, min_jump_s=config.reset_time_jump_s,
            max_jump_s=max(config.reset_time_jump_max_s, config.reset_time_jump_s),
        )
        if requested:
            self._reset_rule.forget()
            self._reset_rule.check(stamp_ns, size, frame_id)
            return "reset service called"
        return self._reset_rule.check(stamp_ns, size, frame_id)

    def _subscribed(self) -> dict[str, bool]:
        return {
            "labels": self.pub_labels.get_subscription_count() > 0,
            "color": self.pub_color.get_subscription_count() > 0,
            "overlay": self.pub_overlay.get_subscription_count() > 0,
            "masks": self.pub_masks.get_subscription_count() > 0,
            "timing": self.pub_timing.get_subscription_count() > 0,
        }

    def prepare(self, job: FrameJob, segmenter: Any) -> Optional[PreparedFrame]:
        """Decodes a frame and applies a due cache reset (worker thread).

        Returns None, after counting it, for bad input and when nobody subscribes to any
        output; otherwise the frame for the segmenter.
        """
        start_ns = time.monotonic_ns()
        try:
            rgb, header = self._decode(job.msg)
            check_frame(rgb)  # what the segmenter will demand: refused here, alone
        except (ImageEncodingError, SerializedImageError, ValueError) as error:
            # Throttled per kind of problem: the message up to its first number or quoted
            # string (those come from the sender: keying by them would let it flood the log).
            self.report_error("input:" + re.match(r"[^0-9'\"]{0,40}", str(error)).group(0), str(error))
            return None
        decoded_ns = time.monotonic_ns()

        wanted = self._subscribed()
        if not any(wanted.values()):
            self.skipped_idle += 1
            return None

        stamp_ns = _stamp_ns(header.stamp)
        reason = self._reset_reason(stamp_ns, rgb.shape[:2], header.frame_id)
        if reason:
            segmenter.reset(stream=self.topic)
            self.resets += 1
            self.node.get_logger().info(f"topic '{self.topic}': feature cache reset ({reason})")
        return PreparedFrame(job, rgb, header, stamp_ns, wanted, start_ns, decoded_ns)

    def publish(
        self, frame: PreparedFrame, result: Any, segmented_ns: int, names: list[str], colors: np.ndarray, msgs: Any
    ) -> None:
        """Renders and publishes the outputs of a segmented frame, and records its timing (worker thread)."""
        job, rgb, header, stamp_ns, wanted = frame.job, frame.rgb, frame.header, frame.stamp_ns, frame.wanted
        start_ns, decoded_ns = frame.start_ns, frame.decoded_ns

        labels = result.labels  # (H, W) class ids at the camera's resolution
        output_ms: dict[str, float] = {}  # per-output rendering + publishing time

        def timed(name: str, started_ns: int) -> None:
            output_ms[f"output/{name}"] = (time.monotonic_ns() - started_ns) / 1e6
            self.rendered[name] += 1

        if wanted["labels"]:
            began = time.monotonic_ns()
            self.pub_labels.publish(self._label_image(header, labels))
            timed("labels", began)
        if wanted["color"] or wanted["overlay"]:
            began = time.monotonic_ns()
            if self._lut is None:
                self._lut = color_lut(colors)
            color = colorize(labels, colors, self._lut)  # (H, W, 3) RGB
            if wanted["color"]:
                self.pub_color.publish(self._rgb_image(header, color))
                timed("color", began)
            if wanted["overlay"]:
                began = time.monotonic_ns()
                blended = overlay(rgb, color, self.node.config.overlay_alpha)
                self.pub_overlay.publish(self._rgb_image(header, blended))
                timed("overlay", began)
        if wanted["masks"]:
            began = time.monotonic_ns()
            self.pub_masks.publish(self._masks(msgs, header, labels, names))
            timed("masks", began)
        published_ns = time.monotonic_ns()
        wall_now_ns = time.time_ns()

        stages = {f"segmenter/{k}": float(v) for k, v in result.timings.items()}
        stages.update(output_ms)
        stages.update(
            receive=(job.wall_received_ns - stamp_ns) / 1e6,
            queue=(start_ns - job.received_ns) / 1e6,
            decode=(decoded_ns - start_ns) / 1e6,
            segment=(segmented_ns - decoded_ns) / 1e6,
            publish=(published_ns - segmented_ns) / 1e6,
            node=(published_ns - job.received_ns) / 1e6,
            end_to_end=(wall_now_ns - stamp_ns) / 1e6,
        )
        if wanted["timing"]:
            timing = msgs.SegmentationTiming()
            timing.header = header
            timing.path = int(result.path)
            timing.cache_warm = bool(result.cache_warm)
            timing.batch_size = int(result.batch_size)
            timing.stage_names = list(result.timings.keys())
            timing.stage_ms = [float(v) for v in result.timings.values()]
            timing.receive_ms = stages["receive"]
            timing.queue_ms = stages["queue"]
            timing.decode_ms = stages["decode"]
            timing.segment_ms = stages["segment"]
            timing.publish_ms = stages["publish"]
            timing.node_ms = stages["node"]
            timing.end_to_end_ms = (time.time_ns() - stamp_ns) / 1e6
            timing.dropped_frames = self.dropped
            timing.cache_resets = self.resets
            self.pub_timing.publish(timing)
            self.rendered["timing"] += 1
        with self._lock:
            self.processed += 1
            self._published_times.append(time.monotonic())
            for stage, value in stages.items():
                self._latencies.setdefault(stage, deque(maxlen=LATENCY_WINDOW)).append(value)

    @staticmethod
    def _label_image(header: Any, labels: np.ndarray) -> bytes:
        """Serialized label image: mono8 class ids, or mono16 (little endian) above 255."""
        if labels.dtype != np.uint8:
            labels = labels.astype("<u2")
        height, width = labels.shape
        return serialize_image(
            sec=header.stamp.sec, nanosec=header.stamp.nanosec, frame_id=header.frame_id,
            height=height, width=width,
            encoding="mono8" if labels.dtype == np.uint8 else "mono16",
            step=width * labels.dtype.itemsize, data=np.ascontiguousarray(labels),
        )

    @staticmethod
    def _rgb_image(header: Any, rgb: np.ndarray) -> bytes:
        """Serialized rgb8 image (built directly: one copy of the pixels, not three)."""
        height, width = rgb.shape[:2]
        return serialize_image(
            sec=header.stamp.sec, nanosec=header.stamp.nanosec, frame_id=header.frame_id,
            height=height, width=width, encoding="rgb8", step=width * 3,
            data=np.ascontiguousarray(rgb),
        )

    @staticmethod
    def _masks(msgs: Any, header: Any, labels: np.ndarray, names: list[str]) -> Any:
        message = msgs.ClassMasks()
        message.header = header
        message.height, message.width = labels.shape
        for region in class_regions(labels, num_classes=len(names)):
            entry = msgs.ClassMask()
            entry.class_id = region.class_id
            entry.class_name = names[region.class_id]
            entry.pixel_count = region.pixel_count
            entry.roi = RegionOfInterest(
                x_offset=region.x, y_offset=region.y, width=region.width, height=region.height
            )
            mask = array.array("B")
            mask.frombytes(memoryview(region.mask).cast("B"))
            entry.mask = mask
            message.masks.append(entry)
        return message

    # --- diagnostics (executor thread) ----------------------------------------------------

    def diagnostic_status(self, segmenter: Any) -> DiagnosticStatus:
        config = self.node.config
        now = time.monotonic()
        with self._lock:
            window = 5.0  # seconds over which rates are measured
            input_rate = sum(1 for t in self._received_times if now - t <= window) / min(
                window, max(now - self._started, 1e-3)
            )
            output_rate = sum(1 for t in self._published_times if now - t <= window) / min(
                window, max(now - self._started, 1e-3)
            )
            latencies = {stage: list(values) for stage, values in self._latencies.items()}
            last_received = self._last_received_monotonic
            counters = dict(
                frames_received=self.received,
                frames_processed=self.processed,
                frames_dropped=self.dropped,
                frames_lost_in_transport=self.lost,
                frames_invalid=self.invalid,
                processing_errors=self.errors,
                frames_non_finite_output=self.non_finite,
                frames_skipped_no_subscribers=self.skipped_idle,
                cache_resets=self.resets,
                **{f"cache_resets_{kind}": count for kind, count in self._reset_rule.counts.items()},
            )
            last_error = self.last_error

        level, message = DiagnosticStatus.OK, "ok"
        silent_for = now - (last_received if last_received is not None else self._started)
        if silent_for > config.input_timeout_s:
            level = DiagnosticStatus.ERROR
            infos = self.node.get_publishers_info_by_topic(self.topic)
            kinds = sorted({reliability_name(i.qos_profile.reliability) for i in infos})
            message = silence_message(
                self.topic, silent_for=silent_for, received=counters["frames_received"],
                lost=counters["frames_lost_in_transport"], publishers=len(infos), publisher_kinds=kinds,
                subscribed=self.reliability, incompatible_policy=self.incompatible_policy,
                transports=os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", ""),
            )
        elif config.expected_rate_hz > 0 and now - self._started > 5.0 and output_rate < config.expected_rate_hz:
            level = DiagnosticStatus.WARN
            message = f"output rate {output_rate:.1f} Hz below expected_rate_hz {config.expected_rate_hz:.1f}"
        elif counters["frames_non_finite_output"]:
            level = DiagnosticStatus.ERROR
            message = (f"{counters['frames_non_finite_output']} frame(s) gave NaN/infinite model output "
                       "(not published): check the model's weights and input")
        elif last_error and counters["frames_invalid"] + counters["processing_errors"] > 0:
            level = DiagnosticStatus.WARN
            message = f"bad input: {last_error}"

        values = [
            KeyValue(key="topic", value=self.topic),
            KeyValue(key="input_reliability", value=self.reliability),
            KeyValue(key="output_namespace", value=self.output_namespace),
            KeyValue(key="input_rate_hz", value=f"{input_rate:.2f}"),
            KeyValue(key="output_rate_hz", value=f"{output_rate:.2f}"),
        ]
        values += [KeyValue(key=k, value=str(v)) for k, v in counters.items()]
        values.append(KeyValue(key="reset_jump_limit_s", value=f"{self._reset_rule.jump_limit_s():.3f}"))
        values += [KeyValue(key=f"rendered_{k}", value=str(v)) for k, v in self.rendered.items()]
        for stage, samples in sorted(latencies.items()):
            p50, p95, p99 = _percentiles(samples)
            values += [
                KeyValue(key=f"latency_ms/{stage}/p50", value=f"{p50:.3f}"),
                KeyValue(key=f"latency_ms/{stage}/p95", value=f"{p95:.3f}"),
                KeyValue(key=f"latency_ms/{stage}/p99", value=f"{p99:.3f}"),
            ]
        values.append(KeyValue(key="device", value=str(segmenter.device)))
        values.append(KeyValue(key="precision", value=str(segmenter.precision)))
        values.append(KeyValue(key="backend", value=str(segmenter.backend)))
        values.append(KeyValue(key="model_weights_mb", value=f"{segmenter.weights_bytes / 2**20:.1f}"))
        if segmenter.device.type == "cuda":
            import torch

            values.append(
                KeyValue(
                    key="gpu_memory_allocated_mb",
                    value=f"{torch.cuda.memory_allocated(segmenter.device) / 2**20:.1f}",
                )
            )
            values.append(
                KeyValue(
                    key="gpu_memory_reserved_mb",
                    value=f"{torch.cuda.memory_reserved(segmenter.device) / 2**20:.1f}",
                )
            )
            values.append(
                KeyValue(
                    key="gpu_memory_peak_mb",
                    value=f"{torch.cuda.max_memory_allocated(segmenter.device) / 2**20:.1f}",
                )
            )
        values.append(KeyValue(key="last_error", value=last_error))
        return DiagnosticStatus(
            level=level,
            name=f"{self.node.get_name()}: {self.topic}",
            message=message,
            hardware_id=str(segmenter.device),
            values=values,
        )
