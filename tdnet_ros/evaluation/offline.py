"""Offline evaluation: every camera frame of a recording, in order, through the segmenter.

Deterministic and free of any ROS runtime: the recording is read with ``rosbags``, each
frame is segmented in the calling process, and the :class:`EvaluationRecorder` measures
accuracy (against a label topic or a label folder), temporal consistency and latency.
Content that cannot be used is skipped, counted and named; only an unreadable recording or
a missing camera topic raises :class:`BagError`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tdnet_ros.evaluation.bag import IMAGE_TYPES, BagError, BagFrame, DecodeFailure, Recording
from tdnet_ros.evaluation.labels import FolderGroundTruth, GroundTruth, TopicGroundTruth
from tdnet_ros.evaluation.output_bag import PredictionBagWriter
from tdnet_ros.evaluation.recorder import EvaluationRecorder
from tdnet_ros.evaluation.report import Provenance, write_report
from tdnet_ros.evaluation.video import EvaluationVideoWriter, video_caption


class SegmenterLike(Protocol):
    """What the evaluation needs of :class:`tdnet_ros.Segmenter`."""

    num_classes: int
    class_names: Sequence[str]
    class_colors: Any

    def segment(self, frame: np.ndarray, stream: str = ...) -> Any: ...

    def reset(self, stream: str | None = None) -> None: ...


@dataclass
class OfflineSettings:
    """What to evaluate and how (the CLI's options).

    Attributes:
        image_topic: camera topic (``sensor_msgs/Image`` or ``CompressedImage``).
        label_topic: ground-truth topic (mono8 class ids), matched by header stamp.
        label_dir: folder of Cityscapes-style label PNGs (instead of ``label_topic``).
        label_match: for ``label_dir``: ``"index"`` (frame position) or ``"stamp"``.
        label_index_offset: for ``label_dir`` with ``"index"``: added to the frame position.
        label_tolerance_ms: a label message matches a frame within this stamp difference.
        require_labels: fail (instead of evaluating without accuracy) when the label topic
            is missing.
        max_gap_s: a forward stamp jump larger than this resets the temporal state.
        max_frames: stop after this many evaluated frames (None: all).
        flow_max_side: resolution limit of the optical flow for temporal consistency.
        stream: stream name used with the segmenter.
        video_path: write the overlay video here (None: no video).
        output_bag: write a copy of the recording with the predictions here (None: no bag).
        output_bag_storage: ``"mcap"`` or ``"sqlite3"`` for ``output_bag``.
        progress: show a progress bar on stderr.
    """

    image_topic: str
    label_topic: str | None = None
    label_dir: Path | None = None
    label_match: str = "index"
    label_index_offset: int = 0
    label_tolerance_ms: float = 1.0
    require_labels: bool = False
    max_gap_s: float = 0.5
    max_frames: int | None = None
    flow_max_side: int | None = 640
    stream: str = "evaluation"
    video_path: Path | None = None
    output_bag: Path | None = None
    output_bag_storage: str = "mcap"
    progress: bool = True


@dataclass
class OfflineResult:
    """What an offline evaluation produced."""

    recorder: EvaluationRecorder
    recording: Path
    image_topic: str
    ground_truth: str  # description of the ground-truth source, or "none"
    wall_time_s: float
    video_path: Path | None = None
    output_bag: Path | None = None
    topics: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "offline"  # or "cityscapes" (the dataset protocol)


def _recorded_frame_rate(recording: Recording, frame_count: int) -> float:
    """Camera rate estimated from the recording's duration (for the overlay video)."""
    duration_s = recording.reader.duration / 1e9
    if frame_count < 2 or duration_s <= 0:
        return 10.0
    return float(min(max((frame_count - 1) / duration_s, 1.0), 60.0))


@dataclass
class StreamTimeline:
    """Header-stamp and frame_id checks between consecutive frames of one camera.

    Args:
        max_gap_s: a forward jump larger than this is a discontinuity.
    """

    max_gap_s: float
    last_stamp_ns: int | None = None
    last_frame_id: str | None = None

    def check(self, stamp_ns: int | None, frame_id: str) -> tuple[str, str]:
        """Judges the next frame.

        Returns:
            ``(category, reason)`` when the frame is to be skipped (``no_stamp``,
            ``stamp_backwards``, ``duplicate_stamp``); otherwise ``("", reason)``, where a
            non-empty reason says why the temporal state must be reset first.
        """
        if stamp_ns is None:
            return "no_stamp", "message has no readable header stamp"
        last = self.last_stamp_ns
        if last is not None and stamp_ns < last:
            return "stamp_backwards", (f"stamp {stamp_ns} ns is {(last - stamp_ns) / 1e6:.3f} ms "
                                       f"before the previous frame's {last} ns")
        if last is not None and stamp_ns == last:
            return "duplicate_stamp", f"same stamp {stamp_ns} ns as the previous frame"
        reset = ""
        if last is not None and (stamp_ns - last) / 1e9 > self.max_gap_s:
            reset = f"gap of {(stamp_ns - last) / 1e9:.3f} s (> {self.max_gap_s} s)"
        elif self.last_frame_id is not None and frame_id != self.last_frame_id:
            reset = f"frame_id changed from '{self.last_frame_id}' to '{frame_id}'"
        self.last_stamp_ns, self.last_frame_id = stamp_ns, frame_id
        return "", reset


def _ground_truth_for(ground_truth: GroundTruth | None, frame: BagFrame,
                      recorder: EvaluationRecorder) -> np.ndarray | None:
    """The frame's label map, or None (problems with it are recorded as skipped labels)."""
    if ground_truth is None:
        return None
    item = f"#{frame.index}"
    lookup = ground_truth.lookup(frame.index, frame.stamp_ns)
    truth = lookup.labels
    if truth is None:
        if lookup.reason:
            recorder.skip(ground_truth.description, item, frame.stamp_ns, "label", lookup.reason)
        return None
    height, width = frame.data.shape[:2]
    if truth.shape != (height, width):
        recorder.skip(ground_truth.description, item, frame.stamp_ns, "label_size_mismatch",
                      f"label map is {truth.shape[1]}x{truth.shape[0]}, the frame "
                      f"{width}x{height}")
        return None
    return truth


def _open_ground_truth(recording: Recording, settings: OfflineSettings,
                       recorder: EvaluationRecorder) -> GroundTruth | None:
    if settings.label_topic and settings.label_dir:
        raise ValueError("give either a label topic or a label folder, not both")
    if settings.label_dir:
        return FolderGroundTruth(
            Path(settings.label_dir), match=settings.label_match,
            index_offset=settings.label_index_offset,
        )
    if settings.label_topic:
        try:
            return TopicGroundTruth(
                recording, settings.label_topic,
                tolerance_ns=int(settings.label_tolerance_ms * 1e6),
            )
        except BagError as error:
            if settings.require_labels:
                raise
            recorder.skip(settings.label_topic, "(topic)", None, "label_topic_missing",
                          str(error))
            recorder.note(f"label topic {settings.label_topic} unusable: accuracy not measured")
    return None


def evaluate_offline(recording_path: str | Path, segmenter: SegmenterLike,
                     settings: OfflineSettings) -> OfflineResult:
    """Runs every frame of ``settings.image_topic`` through ``segmenter`` and measures it.

    Raises:
        BagError: the recording is unreadable, or the camera topic is missing or of the
            wrong type (the message lists the recording's topics).
        ValueError: contradictory settings.
    """
    from tqdm import tqdm

    recording_path = Path(recording_path)
    started = time.perf_counter()
    recorder = EvaluationRecorder(
        num_classes=int(segmenter.num_classes), class_names=tuple(segmenter.class_names),
        flow_max_side=settings.flow_max_side,
    )
    topic = settings.image_topic
    video = None
    if settings.video_path is not None:
        video = EvaluationVideoWriter(settings.video_path, np.asarray(segmenter.class_colors),
                                      tuple(segmenter.class_names))
    prediction_bag = None
    if settings.output_bag is not None:
        prediction_bag = PredictionBagWriter(
            Path(settings.output_bag), topic, storage=settings.output_bag_storage
        )

    with Recording(recording_path) as recording:
        frame_count = recording.check_topic(topic, "image", IMAGE_TYPES)
        ground_truth = _open_ground_truth(recording, settings, recorder)
        if video is not None:
            video.fps = _recorded_frame_rate(recording, frame_count)
        segmenter.reset(settings.stream)
        timeline = StreamTimeline(settings.max_gap_s)
        stopped_early = False
        progress = tqdm(
            total=frame_count if settings.max_frames is None
            else min(frame_count, settings.max_frames),
            desc=f"evaluating {topic}", unit="frame", disable=not settings.progress,
            file=sys.stderr, dynamic_ncols=True,
        )
        try:
            for frame in recording.images(topic):
                if settings.max_frames is not None and len(recorder.frames) >= settings.max_frames:
                    stopped_early = True
                    recorder.note(f"stopped after {settings.max_frames} frames (--max-frames)")
                    break
                progress.update(1)
                item = f"#{frame.index}"
                if isinstance(frame.data, DecodeFailure):
                    recorder.skip(topic, item, frame.stamp_ns, "decode", frame.data.reason)
                    recorder.break_sequence()
                    continue
                skip_category, reason = timeline.check(frame.stamp_ns, frame.frame_id)
                if skip_category:
                    recorder.skip(topic, item, frame.stamp_ns, skip_category, reason)
                    if skip_category == "no_stamp":
                        recorder.break_sequence()
                    continue
                if reason:  # a discontinuity: the temporal state starts afresh
                    segmenter.reset(settings.stream)
                    recorder.reset_stream(f"frame {item}: {reason}")
                rgb = frame.data
                truth = _ground_truth_for(ground_truth, frame, recorder)

                tick = time.perf_counter()
                try:
                    output = segmenter.segment(rgb, stream=settings.stream)
                except Exception as error:  # bad content must not end the evaluation
                    recorder.skip(topic, item, frame.stamp_ns, "segmenter",
                                  f"the segmenter refused the frame: "
                                  f"{type(error).__name__}: {error}")
                    recorder.break_sequence()
                    continue
                latency_ms = (time.perf_counter() - tick) * 1000.0
                labels = np.asarray(output.labels)
                recorder.add_frame(
                    frame.index, frame.stamp_ns, rgb, labels, truth, latency_ms,
                    timings_ms=dict(getattr(output, "timings", {}) or {}),
                    path=getattr(output, "path", None),
                    cache_warm=getattr(output, "cache_warm", None),
                )
                if video is not None:
                    video.add(rgb, labels, truth, video_caption(recorder, frame.index, f"{latency_ms:.0f} ms"))
                if prediction_bag is not None:
                    prediction_bag.add(frame.index, frame.stamp_ns, frame.frame_id, labels)
        finally:
            progress.close()

        for error in recording.read_errors:
            recorder.skip(str(recording_path), "(storage)", None, "recording_damaged", error)
        if ground_truth is not None:
            for item_name, reason in ground_truth.problems():
                recorder.skip(ground_truth.description, item_name, None, "label", reason)
            if not stopped_early:
                for key in ground_truth.unmatched():
                    recorder.skip(ground_truth.description, str(key), None, "label_unmatched",
                                  "no evaluated camera frame matches this label map")
        topics = [t.__dict__ for t in recording.topics()]

    result = OfflineResult(
        recorder=recorder, recording=recording_path, image_topic=topic,
        ground_truth=ground_truth.description if ground_truth is not None else "none",
        wall_time_s=0.0, topics=topics,
    )
    if video is not None:
        result.video_path = video.close()
    if prediction_bag is not None:
        result.output_bag, remarks = prediction_bag.write(recording_path)
        for remark in remarks:
            recorder.note(remark)
    result.wall_time_s = time.perf_counter() - started
    return result


def write_offline_report(result: OfflineResult, provenance: Provenance, out_dir: Path,
                         json_path: Path | None = None) -> dict[str, Any]:
    """Writes the report of an offline evaluation; returns the JSON results."""
    extra = {
        "mode": result.mode,
        "recording": str(result.recording),
        "image_topic": result.image_topic,
        "ground_truth": result.ground_truth,
        "wall_time_s": result.wall_time_s,
        "output_bag": str(result.output_bag) if result.output_bag else None,
        "recording_topics": result.topics,
    }
    return write_report(result.recorder, provenance, out_dir, extra=extra,
                        video=result.video_path, json_path=json_path)
