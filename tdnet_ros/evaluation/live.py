"""Live evaluation: the recording played into real ROS 2 topics, the node in its own process.

Three parts, as deployed:

* the **node** (``segmenter_node``) runs as its own process, subscribed to the camera topic;
* the **player** (:class:`RecordingPlayer`, rclpy + ``rosbags``) publishes the camera and
  ground-truth topics of the recording at the recorded rate times a factor, restamping the
  headers onto the wall clock (so the node's and the evaluator's "end to end from the
  image stamp" mean what they say) with one mapping shared by all topics, so a label and
  its frame keep equal stamps;
* the **evaluator** (:class:`LiveEvaluator`) subscribes to the node's label and timing
  outputs and to the ground truth, and records what arrives and when.

After playback, the received predictions are matched to the recording's frames by stamp and
measured by the same :class:`EvaluationRecorder` as the offline mode, plus dropped frames and
end-to-end latency. Metrics run after playback, never concurrently with the node, so they do
not steal its CPU. This is the only evaluation module that imports rclpy (lazily).
"""

from __future__ import annotations

import array
import bisect
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tdnet_ros.evaluation.bag import (
    IMAGE_TYPES,
    BagError,
    DecodeFailure,
    Recording,
    label_image_to_array,
    stamp_to_ns,
)
from tdnet_ros.evaluation.output_bag import prediction_topic
from tdnet_ros.evaluation.recorder import EvaluationRecorder, latency_summary
from tdnet_ros.evaluation.video import EvaluationVideoWriter, video_caption
from tdnet_ros.runtime import RuntimeConfig, input_size_text

COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"


class LiveEvaluationError(RuntimeError):
    """The live evaluation could not run (the node did not start, nothing was received)."""


@dataclass
class LiveSettings:
    """Options of the live mode.

    Attributes:
        image_topic: camera topic in the recording.
        label_topic: ground-truth topic in the recording (mono8 class ids), or None.
        rate: playback speed as a multiple of the recorded rate.
        checkpoint: checkpoint for the node ("" = its bundled default model).
        model: model name for the node ("" = from the checkpoint).
        runtime: the node's runtime configuration (device, precision, backend, preprocess,
            input size, engine folder), passed as its parameters of the same names.
        startup_timeout_s: how long the node may take to load and subscribe.
        drain_timeout_s: after the last frame, how long to wait for outstanding outputs.
        max_frames: play at most this many camera frames.
        label_tolerance_ms: a label matches a frame within this (recorded) stamp difference.
        warmup_frames: before playback, the first frame is sent this many times (each after
            the previous output) so the node's one-time start-up cost is not measured.
        log_path: where the node's output is written.
        flow_max_side: resolution limit of the optical flow for temporal consistency.
    """

    image_topic: str
    label_topic: str | None = None
    rate: float = 1.0
    checkpoint: str = ""
    model: str = ""
    runtime: RuntimeConfig = RuntimeConfig(device="cpu")
    startup_timeout_s: float = 120.0
    drain_timeout_s: float = 3.0
    warmup_frames: int = 2
    label_tolerance_ms: float = 1.0
    max_frames: int | None = None
    log_path: Path | None = None
    flow_max_side: int | None = 640


@dataclass
class PublishedFrame:
    """A camera message the player published."""

    index: int  # position on the camera topic
    original_stamp_ns: int | None
    live_stamp_ns: int | None
    published_wall_ns: int


@dataclass
class ReceivedPrediction:
    labels_png: bytes
    received_wall_ns: int


@dataclass
class LiveResult:
    """What a live run produced, before measuring (see :func:`measure_live`)."""

    published: list[PublishedFrame] = field(default_factory=list)
    predictions: dict[int, ReceivedPrediction] = field(default_factory=dict)  # live stamp ->
    timings: dict[int, Any] = field(default_factory=dict)  # live stamp -> timing fields
    ground_truth: dict[int, bytes] = field(default_factory=dict)  # live stamp -> PNG
    node_dropped_frames: int | None = None
    node_exit_code: int | None = None
    node_log: str = ""
    playback_s: float = 0.0
    labels_topic: str = ""
    live_image_topic: str = ""
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # source, kind, why
    warmup_frames: int = 0


def _ros_time(stamp_ns: int) -> tuple[int, int]:
    return divmod(int(stamp_ns), 1_000_000_000)


def _byte_array(data: Any) -> array.array:
    """Bytes as ``array('B')``: rclpy's fast path for uint8[] fields."""
    buffer = array.array("B")
    buffer.frombytes(np.asarray(data, dtype=np.uint8).tobytes())
    return buffer


class RecordingPlayer:
    """Publishes camera and label messages of a recording at their recorded pace.

    Args:
        node: the rclpy node to publish from.
        recording: the open recording.
        topics: {recording topic: live topic} to play.
        rate: playback speed factor.
    """

    def __init__(self, node: Any, recording: Recording, topics: dict[str, str],
                 rate: float = 1.0) -> None:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        if rate <= 0:
            raise ValueError(f"playback rate must be > 0, got {rate}")
        self.node = node
        self.recording = recording
        self.rate = rate
        self.topics = topics
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                         reliability=ReliabilityPolicy.RELIABLE)
        self._types: dict[str, str] = {}
        self.publishers: dict[str, Any] = {}
        for topic, live_topic in topics.items():
            msgtype = recording.reader.topics[topic].msgtype
            if msgtype not in IMAGE_TYPES:
                raise ValueError(f"can only play image topics; {topic} is {msgtype}")
            self._types[topic] = msgtype
            message_class = CompressedImage if msgtype == COMPRESSED_TYPE else Image
            self.publishers[topic] = node.create_publisher(message_class, live_topic, qos)

    def _to_ros(self, msgtype: str, message: Any, live_stamp_ns: int | None) -> Any:
        """A rclpy message with the fields of a rosbags message (ROS 1 or 2), restamped."""
        from sensor_msgs.msg import CompressedImage, Image

        ros_message = CompressedImage() if msgtype == COMPRESSED_TYPE else Image()
        if live_stamp_ns is not None:
            sec, nanosec = _ros_time(live_stamp_ns)
            ros_message.header.stamp.sec, ros_message.header.stamp.nanosec = sec, nanosec
        ros_message.header.frame_id = str(message.header.frame_id)
        if msgtype == COMPRESSED_TYPE:
            ros_message.format = str(message.format)
        else:
            # Fields as recorded, even inconsistent ones: the node must cope with them.
            ros_message.height = int(message.height) & 0xFFFFFFFF
            ros_message.width = int(message.width) & 0xFFFFFFFF
            ros_message.encoding = str(message.encoding)
            ros_message.is_bigendian = int(message.is_bigendian) & 0xFF
            ros_message.step = int(message.step) & 0xFFFFFFFF
        ros_message.data = _byte_array(message.data)
        return ros_message

    def first_camera_message(self, camera_topic: str) -> Any | None:
        """The first camera message that deserializes (for warming the node up)."""
        connections = [c for c in self.recording.reader.connections if c.topic == camera_topic]
        for connection, _, raw in self.recording.reader.messages(connections=connections):
            try:
                return connection.msgtype, self.recording.reader.deserialize(
                    raw, connection.msgtype)
            except Exception:
                continue
        return None

    def warm_up(self, camera_topic: str, frames: int, outputs: Any,
                timeout_s: float = 60.0, retry_s: float = 2.0) -> int:
        """Publishes the first camera frame ``frames`` times, each after the previous output.

        The node loads lazily what it needs on its first frames (allocation, kernels); this
        keeps that cost out of the measured playback. Stamps are the wall clock now, and
        playback starts more than the node's reset gap (0.5 s) later, so the node's cache
        starts afresh for the measured frames.

        A frame whose outputs do not come back within ``retry_s`` is sent again (an output
        published before the evaluator's subscription matched is lost), until ``timeout_s``.

        Args:
            outputs: callable returning a tuple of counts of outputs received so far; a
                frame is answered when every count has grown.

        Returns:
            How many warm-up frames were answered.
        """
        first = self.first_camera_message(camera_topic)
        if first is None or frames <= 0:
            return 0
        msgtype, message = first
        done = 0
        deadline = time.monotonic() + timeout_s
        while done < frames and time.monotonic() < deadline:
            before = outputs()
            self.publishers[camera_topic].publish(
                self._to_ros(msgtype, message, time.time_ns()))
            retry_at = min(deadline, time.monotonic() + retry_s)
            while time.monotonic() < retry_at:
                if all(now > then for now, then in zip(outputs(), before)):
                    done += 1
                    break
                time.sleep(0.01)
        time.sleep(1.0)  # a gap larger than the node's reset_time_jump_s before playback
        return done

    def play(self, camera_topic: str, max_frames: int | None = None,
             stop: threading.Event | None = None, progress: Any = None
             ) -> list[PublishedFrame]:
        """Plays the topics; returns the camera frames published (blocking).

        Stamps move onto the wall clock with one affine map for all topics:
        ``live = start_wall + (stamp - first_stamp) / rate``.
        """
        connections = [c for c in self.recording.reader.connections if c.topic in self.topics]
        published: list[PublishedFrame] = []
        first_bag_time: int | None = None
        first_stamp: int | None = None
        start_monotonic = time.monotonic()
        start_wall_ns = time.time_ns()
        camera_index = -1
        for connection, bag_time, raw in self.recording.reader.messages(connections=connections):
            if stop is not None and stop.is_set():
                break
            is_camera = connection.topic == camera_topic
            if is_camera:
                camera_index += 1
                if max_frames is not None and camera_index >= max_frames:
                    break
            if first_bag_time is None:
                first_bag_time = bag_time
            due = start_monotonic + (bag_time - first_bag_time) / 1e9 / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                message = self.recording.reader.deserialize(raw, connection.msgtype)
                stamp = stamp_to_ns(message.header.stamp)
            except Exception:  # undecodable: nothing sensible to publish
                if is_camera:
                    published.append(PublishedFrame(camera_index, None, None, time.time_ns()))
                    if progress is not None:
                        progress.update(1)
                continue
            if first_stamp is None:
                first_stamp = stamp
            live_stamp = max(0, start_wall_ns + int((stamp - first_stamp) / self.rate))
            ros_message = self._to_ros(connection.msgtype, message, live_stamp)
            self.publishers[connection.topic].publish(ros_message)
            if is_camera:
                published.append(PublishedFrame(camera_index, stamp, live_stamp, time.time_ns()))
                if progress is not None:
                    progress.update(1)
        return published


class LiveEvaluator:
    """Subscribes to the node's labels and timing and to the ground truth; stores arrivals.

    Args:
        node: the rclpy node to subscribe from.
        labels_topic: the node's label output (mono8 class ids).
        timing_topic: the node's timing output (``tdnet_ros/SegmentationTiming``), or None.
        truth_topic: the live ground-truth topic, or None.
    """

    def __init__(self, node: Any, labels_topic: str, timing_topic: str | None,
                 truth_topic: str | None) -> None:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        self.result_lock = threading.Lock()
        self.predictions: dict[int, ReceivedPrediction] = {}
        self.timings: dict[int, dict[str, Any]] = {}
        self.ground_truth: dict[int, bytes] = {}
        self.last_node_dropped: int | None = None
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                         reliability=ReliabilityPolicy.RELIABLE)
        self.labels_subscription = node.create_subscription(Image, labels_topic,
                                                            self._on_labels, qos)
        self.timing_subscription = None
        if timing_topic is not None:
            try:
                from tdnet_ros.ros.interfaces import load_messages

                timing_type = load_messages().SegmentationTiming
                self.timing_subscription = node.create_subscription(
                    timing_type, timing_topic, self._on_timing, qos)
            except ImportError:  # messages not built: labels and latency still work
                self.timing_subscription = None
        self.truth_subscription = None
        if truth_topic is not None:
            self.truth_subscription = node.create_subscription(Image, truth_topic,
                                                               self._on_truth, qos)

    @staticmethod
    def _png(message: Any) -> bytes | None:
        try:
            labels = label_image_to_array(message.height, message.width, message.encoding,
                                          message.step, message.is_bigendian, message.data)
        except ValueError:
            return None
        ok, png = cv2.imencode(".png", labels)
        return png.tobytes() if ok else None

    def _on_labels(self, message: Any) -> None:
        received = time.time_ns()
        png = self._png(message)
        if png is not None:
            with self.result_lock:
                self.predictions[stamp_to_ns(message.header.stamp)] = ReceivedPrediction(
                    png, received)

    def _on_timing(self, message: Any) -> None:
        stages = dict(zip(message.stage_names, (float(v) for v in message.stage_ms)))
        # "total" is the evaluator's end to end; the segmenter's own total is renamed.
        if "total" in stages:
            stages["segmenter_total"] = stages.pop("total")
        for name in ("receive", "queue", "decode", "publish"):
            if hasattr(message, f"{name}_ms"):  # receive_ms: newer message definitions
                stages[f"node_{name}"] = float(getattr(message, f"{name}_ms"))
        fields = {"stages": stages, "path": int(message.path),
                  "cache_warm": bool(message.cache_warm),
                  "node_end_to_end_ms": float(message.end_to_end_ms),
                  "cache_resets": int(message.cache_resets)}
        with self.result_lock:
            self.timings[stamp_to_ns(message.header.stamp)] = fields
            self.last_node_dropped = int(message.dropped_frames)

    def _on_truth(self, message: Any) -> None:
        png = self._png(message)
        if png is not None:
            with self.result_lock:
                self.ground_truth[stamp_to_ns(message.header.stamp)] = png

    def received(self) -> int:
        with self.result_lock:
            return len(self.predictions)

    def output_counts(self) -> tuple[int, ...]:
        """Labels (and timing messages, when subscribed) received so far."""
        with self.result_lock:
            if self.timing_subscription is None:
                return (len(self.predictions),)
            return len(self.predictions), len(self.timings)

    def matched(self) -> bool:
        """Whether every subscription is matched with a publisher (not just discovered)."""
        subscriptions = [self.labels_subscription, self.timing_subscription,
                         self.truth_subscription]
        return all(sub.get_publisher_count() > 0 for sub in subscriptions if sub is not None)


def node_arguments(settings: LiveSettings, live_topic: str) -> list[str]:
    """``--ros-args`` for segmenter_node: the camera topic, model and runtime configuration."""
    runtime = settings.runtime
    arguments = ["-r", f"image:={live_topic}"]
    for name, value in (("device", runtime.device), ("precision", runtime.precision), ("backend", runtime.backend),
                        ("preprocess", runtime.preprocess), ("input_size", input_size_text(runtime.input_size)),
                        ("engine_dir", runtime.engine_dir)):
        if value != "":
            arguments += ["-p", f"{name}:={value}"]
    if runtime.scales != (1.0,):
        arguments += ["-p", f"scales:=[{', '.join(repr(float(scale)) for scale in runtime.scales)}]"]
    if settings.checkpoint:
        arguments += ["-p", f"checkpoint:={settings.checkpoint}"]
    if settings.model:
        arguments += ["-p", f"model:={settings.model}"]
    return arguments


# Seconds to wait for matched endpoints before retrying with a fresh DDS participant.
DISCOVERY_ATTEMPT_S = 15.0


def _wait_until_matched(player: RecordingPlayer, evaluator: LiveEvaluator, node_process: Any,
                        until: float) -> bool:
    """Waits until the node's camera subscription and every evaluator subscription are
    matched (not merely discovered); False at ``until`` or when the node exits."""
    while time.monotonic() < until and node_process.alive():
        if (all(p.get_subscription_count() > 0 for p in player.publishers.values())
                and evaluator.matched()):
            return True
        time.sleep(0.1)
    return False


def run_live(recording_path: str | Path, settings: LiveSettings,
             progress: bool = True) -> LiveResult:
    """Plays the recording into a freshly started node and records its outputs.

    Raises:
        BagError: unreadable recording or missing camera topic.
        LiveEvaluationError: the node did not start or subscribe in time.
    """
    from tqdm import tqdm

    from tdnet_ros.ros.testing import GraphClient, NodeProcess, pick_domain_id

    recording_path = Path(recording_path)
    result = LiveResult()
    with Recording(recording_path) as recording:
        recording.check_topic(settings.image_topic, "image", IMAGE_TYPES)
        camera_type = recording.reader.topics[settings.image_topic].msgtype
        live_topic = settings.image_topic
        if camera_type == COMPRESSED_TYPE and not live_topic.endswith("/compressed"):
            live_topic += "/compressed"  # how the node tells CompressedImage topics apart
        topics = {settings.image_topic: live_topic}
        truth_live = None
        if settings.label_topic:
            try:
                recording.check_topic(settings.label_topic, "label", ("sensor_msgs/msg/Image",))
                truth_live = settings.label_topic
                topics[settings.label_topic] = truth_live
            except BagError as error:
                result.problems.append((settings.label_topic, "label_topic_missing", str(error)))
        result.live_image_topic = live_topic
        result.labels_topic = prediction_topic(live_topic, "labels")
        timing_topic = prediction_topic(live_topic, "timing")

        domain_id = pick_domain_id()
        log_path = settings.log_path or Path("outputs") / "live-node.log"
        node_process = NodeProcess(node_arguments(settings, live_topic), domain_id=domain_id,
                                   log_path=log_path)
        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        deadline = time.monotonic() + settings.startup_timeout_s
        client = None
        try:
            while True:
                # A fresh participant per attempt: now and then two participants on one
                # host never discover each other, and a new one does at once.
                client = GraphClient("tdnet_live_evaluator", domain_id)
                evaluator = LiveEvaluator(client.node, result.labels_topic, timing_topic,
                                          truth_live)
                player = RecordingPlayer(client.node, recording, topics, settings.rate)
                attempt_end = min(deadline, time.monotonic() + DISCOVERY_ATTEMPT_S)
                ready = _wait_until_matched(player, evaluator, node_process, attempt_end)
                if ready or time.monotonic() >= deadline or not node_process.alive():
                    break
                client.close()
                client = None
            if not ready:
                state = "exited" if not node_process.alive() else "did not subscribe"
                raise LiveEvaluationError(
                    f"segmenter_node {state} within {settings.startup_timeout_s:.0f} s "
                    f"(camera topic {live_topic}); its log ({log_path}):\n"
                    + node_process.log()[-3000:]
                )
            result.warmup_frames = player.warm_up(settings.image_topic, settings.warmup_frames,
                                                  evaluator.output_counts)
            with evaluator.result_lock:  # warm-up outputs are not measured
                evaluator.predictions.clear()
                evaluator.timings.clear()
                warmup_dropped = evaluator.last_node_dropped or 0
            frame_count = recording.reader.topics[settings.image_topic].msgcount
            if settings.max_frames is not None:
                frame_count = min(frame_count, settings.max_frames)
            bar = tqdm(total=frame_count, desc=f"playing {live_topic}", unit="frame",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            started = time.monotonic()
            try:
                result.published = player.play(settings.image_topic, settings.max_frames,
                                                progress=bar)
            finally:
                bar.close()
            result.playback_s = time.monotonic() - started
            expected = sum(1 for frame in result.published if frame.live_stamp_ns is not None)
            # Wait for outputs in flight: until all arrived or nothing new for a while.
            last_count, last_change = -1, time.monotonic()
            while time.monotonic() - last_change < settings.drain_timeout_s:
                count = evaluator.received()
                if count >= expected:
                    break
                if count != last_count:
                    last_count, last_change = count, time.monotonic()
                time.sleep(0.05)
            with evaluator.result_lock:
                result.predictions = dict(evaluator.predictions)
                result.timings = dict(evaluator.timings)
                result.ground_truth = dict(evaluator.ground_truth)
                if evaluator.last_node_dropped is not None:
                    result.node_dropped_frames = evaluator.last_node_dropped - warmup_dropped
        finally:
            if client is not None:
                client.close()
            result.node_exit_code, _ = node_process.stop()
            node_process.kill()
            result.node_log = node_process.log()
    return result


def _nearest(by_stamp: dict[int, bytes], stamps: list[int], stamp: int | None,
             tolerance_ns: int) -> bytes | None:
    """The entry whose stamp is nearest to ``stamp``, within ``tolerance_ns``."""
    if stamp is None or not stamps:
        return None
    position = bisect.bisect_left(stamps, stamp)
    candidates = stamps[max(0, position - 1): position + 1]
    nearest = min(candidates, key=lambda s: abs(s - stamp))
    return by_stamp[nearest] if abs(nearest - stamp) <= tolerance_ns else None


def node_cache_resets(timings: dict[int, dict]) -> int | None:
    """Cache resets the node made during the evaluation: its timing messages carry its
    running count, and the node was started for this evaluation (warm-up included)."""
    counts = [t["cache_resets"] for t in timings.values() if "cache_resets" in t]
    return max(counts) if counts else None


def measure_live(recording_path: str | Path, live: LiveResult, settings: LiveSettings,
                 num_classes: int, class_names: tuple[str, ...],
                 video: EvaluationVideoWriter | None = None
                 ) -> tuple[EvaluationRecorder, dict[str, Any]]:
    """Matches the received predictions to the recording's frames and measures them.

    ``video``, if given, receives each frame with its received prediction.

    Returns:
        The recorder (accuracy, temporal consistency, latency) and the live-only results:
        ``dropped_frames``, ``published_frames``, ``end_to_end_latency_ms`` and more.
    """
    recorder = EvaluationRecorder(num_classes, class_names, flow_max_side=settings.flow_max_side)
    for source, kind, reason in live.problems:
        recorder.skip(source, "(topic)", None, kind, reason)
        if kind == "label_topic_missing":
            recorder.note(f"label topic {source} unusable: accuracy not measured")
    by_index = {frame.index: frame for frame in live.published}
    truth_stamps = sorted(live.ground_truth)
    tolerance_ns = int(settings.label_tolerance_ms * 1e6 / settings.rate)
    dropped: list[int] = []
    end_to_end: list[float] = []
    with Recording(recording_path) as recording:
        for frame in recording.images(settings.image_topic):
            published = by_index.get(frame.index)
            if published is None:
                break  # playback stopped before this frame
            item = f"#{frame.index}"
            if isinstance(frame.data, DecodeFailure):
                recorder.skip(settings.image_topic, item, frame.stamp_ns, "decode",
                              frame.data.reason)
                recorder.break_sequence()
                continue
            prediction = live.predictions.get(published.live_stamp_ns)
            if prediction is None:
                dropped.append(frame.index)
                continue
            labels = cv2.imdecode(np.frombuffer(prediction.labels_png, np.uint8),
                                  cv2.IMREAD_UNCHANGED)
            if labels.shape != frame.data.shape[:2]:
                recorder.skip(live.labels_topic, item, frame.stamp_ns, "prediction_size",
                              f"prediction is {labels.shape[1]}x{labels.shape[0]}, the frame "
                              f"{frame.data.shape[1]}x{frame.data.shape[0]}")
                continue
            truth = None
            truth_png = _nearest(live.ground_truth, truth_stamps, published.live_stamp_ns,
                                 tolerance_ns)
            if truth_png is not None:
                truth = cv2.imdecode(np.frombuffer(truth_png, np.uint8), cv2.IMREAD_UNCHANGED)
                if truth.shape != labels.shape:
                    recorder.skip(settings.label_topic or "", item, frame.stamp_ns,
                                  "label_size_mismatch",
                                  f"label map is {truth.shape[1]}x{truth.shape[0]}, the frame "
                                  f"{labels.shape[1]}x{labels.shape[0]}")
                    truth = None
            latency_ms = (prediction.received_wall_ns - published.live_stamp_ns) / 1e6
            end_to_end.append(latency_ms)
            timing = live.timings.get(published.live_stamp_ns, {})
            recorder.add_frame(
                frame.index, frame.stamp_ns, frame.data, labels, truth, latency_ms,
                timings_ms=timing.get("stages"), path=timing.get("path"),
                cache_warm=timing.get("cache_warm"))
            if video is not None:
                video.add(frame.data, labels, truth, video_caption(recorder, frame.index, f"{latency_ms:.0f} ms from stamp"))
    published_count = sum(1 for f in live.published if f.live_stamp_ns is not None)
    extra = {
        "mode": "live",
        "rate": settings.rate,
        "published_frames": published_count,
        "received_predictions": len(recorder.frames),
        "dropped_frames": len(dropped),
        "dropped_frame_indices": dropped[:1000],
        "node_dropped_frames": live.node_dropped_frames,
        "warmup_frames": live.warmup_frames,
        "end_to_end_latency_ms": latency_summary(end_to_end),
        "playback_s": live.playback_s,
        "node_exit_code": live.node_exit_code,
        # The node's own count (its cache resets, as its log says them), warm-up included.
        "node_cache_resets": node_cache_resets(live.timings),
        # Output rate of the node over the playback (the offline "fps" is processing speed).
        "fps": len(recorder.frames) / live.playback_s if live.playback_s > 0 else None,
    }
    if dropped:
        recorder.note(
            f"{len(dropped)} of {published_count} published frames got no prediction "
            "(dropped while the node was busy, refused by the node (see node.log), or lost "
            "in transport): they are not in the accuracy"
        )
    return recorder, extra


def main(argv: list[str] | None = None) -> int:
    """``python -m tdnet_ros.evaluation.live BAG``: play image topics of a recording.

    The project's stand-in for ``ros2 bag play`` where no ROS install exists: publishes the
    recording's ``sensor_msgs/Image`` and ``CompressedImage`` topics (or those named with
    ``--topic``) at the recorded rate times ``--rate``, stamps moved onto the wall clock.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tdnet_ros.evaluation.live",
                                     description=main.__doc__.splitlines()[0])
    parser.add_argument("bag", type=Path, help="rosbag2 folder or file, or ROS 1 .bag")
    parser.add_argument("--topic", action="append", default=[],
                        help="topic to play (repeatable; default: every image topic)")
    parser.add_argument("--rate", type=float, default=1.0, help="speed factor (default 1)")
    parser.add_argument("--loop", action="store_true", help="play again and again")
    args = parser.parse_args(argv)

    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")  # camera-sized images
    import rclpy

    try:
        recording = Recording(args.bag)
        recording.open()
    except BagError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    available = {t.name: t.msgtype for t in recording.topics()}
    topics = args.topic or [name for name, kind in available.items() if kind in IMAGE_TYPES]
    missing = [t for t in topics if available.get(t) not in IMAGE_TYPES]
    if missing or not topics:
        print(f"error: no image topic {missing or ''} to play; {recording.describe_topics()}",
              file=sys.stderr)
        return 2
    rclpy.init()
    node = rclpy.create_node("tdnet_bag_player")
    try:
        player = RecordingPlayer(node, recording, {t: t for t in topics}, args.rate)
        camera = topics[0]
        while True:
            published = player.play(camera)
            print(f"played {len(published)} frames of {camera}", file=sys.stderr)
            if not args.loop:
                break
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        recording.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
