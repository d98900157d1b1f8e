"""Collects what an evaluation measures, frame by frame, and summarises it.

Shared by the offline loop (which runs the segmenter itself) and the live evaluator node
(which receives the node's predictions): both hand each frame's prediction, ground truth
and timings to :class:`EvaluationRecorder`, and both report its :meth:`summary`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tdnet_ros.metrics import IGNORE_LABEL, SegmentationScores, TemporalConsistency, mean_iou
from tdnet_ros.metrics import pixel_accuracy as matrix_pixel_accuracy
from tdnet_ros.timing import percentiles

PERCENTILES = (50, 95, 99)
TOTAL_STAGE = "total"
# At most this many skipped items are listed one by one in the JSON (all are counted).
MAX_LISTED_SKIPS = 10000


@dataclass(frozen=True)
class SkippedItem:
    """A message or file the evaluation could not use, and why."""

    source: str  # topic or folder
    item: str  # "#<index>" on a topic, or a file name
    stamp_ns: int | None
    category: str  # short machine-readable kind, e.g. "decode", "stamp_backwards"
    reason: str  # what is wrong, in words


@dataclass
class FrameRecord:
    """Per-frame measurements (one row of the per-frame plots)."""

    index: int
    stamp_ns: int | None
    latency_ms: float  # end to end for this frame
    timings_ms: dict[str, float] = field(default_factory=dict)
    path: int | None = None  # sub-network that ran
    cache_warm: bool | None = None
    miou: float | None = None  # percent, frames with ground truth only
    pixel_accuracy: float | None = None  # percent
    temporal_consistency: float | None = None  # percent, agreement with the previous frame


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99, mean and max of a list of latencies (ms)."""
    if not values_ms:
        return {}
    array = np.asarray(values_ms, dtype=np.float64)
    summary = percentiles(array, PERCENTILES)
    summary["mean"] = float(array.mean())
    summary["max"] = float(array.max())
    return summary


def _percent_or_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * value


@dataclass
class EvaluationRecorder:
    """Accumulates accuracy, temporal consistency, latency and skipped content.

    Args:
        num_classes: number of classes of the model.
        class_names: one name per class id.
        flow_max_side: resolution limit of the optical flow (see :func:`metrics.dense_flow`).
    """

    num_classes: int
    class_names: tuple[str, ...]
    flow_max_side: int | None = 640
    frames: list[FrameRecord] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stream_resets: list[str] = field(default_factory=list)
    frames_without_ground_truth: int = 0
    scores: SegmentationScores = field(init=False)
    temporal: TemporalConsistency = field(init=False)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            self.class_names = tuple(
                self.class_names[i] if i < len(self.class_names) else f"class_{i}"
                for i in range(self.num_classes)
            )
        self.scores = SegmentationScores(self.num_classes)
        self.temporal = TemporalConsistency(flow_max_side=self.flow_max_side,
                                            num_classes=self.num_classes)

    # -- input -----------------------------------------------------------------------

    def skip(self, source: str, item: str, stamp_ns: int | None, category: str,
             reason: str) -> None:
        """Records content that was not used; it is counted and named in the report."""
        self.skipped.append(SkippedItem(source, item, stamp_ns, category, reason))

    def note(self, text: str) -> None:
        """A remark for the report (something that changed the evaluation, not a skip)."""
        if text not in self.notes:
            self.notes.append(text)

    def break_sequence(self) -> None:
        """A discontinuity (a skipped frame): no temporal pair spans it."""
        self.temporal.break_sequence()

    def reset_stream(self, reason: str) -> None:
        """The segmenter's temporal state was reset (gap in time, new frame_id, ...)."""
        self.temporal.break_sequence()
        self.stream_resets.append(reason)

    def add_frame(
        self,
        index: int,
        stamp_ns: int | None,
        frame_rgb: np.ndarray,
        prediction: np.ndarray,
        ground_truth: np.ndarray | None,
        latency_ms: float,
        timings_ms: dict[str, float] | None = None,
        path: int | None = None,
        cache_warm: bool | None = None,
    ) -> FrameRecord:
        """Adds one evaluated frame.

        Args:
            index: frame index on the camera topic.
            stamp_ns: header stamp.
            frame_rgb: (H, W, 3) uint8 camera frame (for the optical flow).
            prediction: (H, W) uint8 predicted class ids.
            ground_truth: (H, W) uint8 class ids (255 ignored) of the same size, or None.
            latency_ms: end-to-end time of this frame.
            timings_ms: per-stage times.
            path: sub-network that ran.
            cache_warm: whether the temporal cache held earlier frames.
        """
        record = FrameRecord(
            index=index, stamp_ns=stamp_ns, latency_ms=float(latency_ms),
            timings_ms={k: float(v) for k, v in (timings_ms or {}).items()},
            path=path, cache_warm=cache_warm,
        )
        if ground_truth is None:
            self.frames_without_ground_truth += 1
        else:
            unknown = (ground_truth >= self.num_classes) & (ground_truth != IGNORE_LABEL)
            if unknown.any():
                ids = np.unique(ground_truth[unknown])[:10].tolist()
                self.note(
                    f"ground truth has class ids {ids} outside the model's 0.."
                    f"{self.num_classes - 1}; those pixels are ignored"
                )
            frame_matrix = self.scores.update(prediction, ground_truth)
            record.miou = _percent_or_none(mean_iou(frame_matrix))
            record.pixel_accuracy = _percent_or_none(matrix_pixel_accuracy(frame_matrix))
        record.temporal_consistency = self.temporal.update(prediction, frame_rgb)
        self.frames.append(record)
        return record

    # -- output ----------------------------------------------------------------------

    @property
    def frames_with_ground_truth(self) -> int:
        return self.scores.frames

    def latency(self) -> dict[str, Any]:
        """{stage: {p50, p95, p99, mean, max}} in ms, plus ``total`` (end to end).

        The end-to-end ``p50``/``p95``/``p99`` are also given at the top level, so that
        ``latency_ms["p95"]`` is the headline figure.
        """
        stages: dict[str, list[float]] = {}
        for frame in self.frames:
            for stage, value in frame.timings_ms.items():
                stages.setdefault(stage, []).append(value)
        result = {stage: latency_summary(values) for stage, values in stages.items()}
        result[TOTAL_STAGE] = latency_summary([f.latency_ms for f in self.frames])
        headline = {key: result[TOTAL_STAGE][key] for key in ("p50", "p95", "p99")
                    if key in result[TOTAL_STAGE]}
        return {**headline, **result}

    def fps(self) -> float | None:
        """Frames per second of processing (frames / summed end-to-end time)."""
        total_s = sum(f.latency_ms for f in self.frames) / 1000.0
        return len(self.frames) / total_s if total_s > 0 else None

    def per_class_iou(self) -> dict[str, float | None]:
        """Per-class IoU in percent, keyed by class name (None: absent in both)."""
        if self.frames_with_ground_truth == 0:
            return {}
        return {
            name: _percent_or_none(value)
            for name, value in zip(self.class_names, self.scores.iou.tolist())
        }

    def skipped_by_category(self) -> dict[str, int]:
        return dict(sorted(Counter(item.category for item in self.skipped).items()))

    def summary(self) -> dict[str, Any]:
        """The measurements as a JSON-ready dict (percentages; None where not measured)."""
        has_truth = self.frames_with_ground_truth > 0
        temporal = self.temporal.value
        return {
            "miou": _percent_or_none(self.scores.mean_iou) if has_truth else None,
            "per_class_iou": self.per_class_iou(),
            "pixel_accuracy": _percent_or_none(self.scores.pixel_accuracy) if has_truth else None,
            "temporal_consistency": None if math.isnan(temporal) else temporal,
            "temporal_pairs": len(self.temporal.pair_scores),
            "temporal_consistency_miou": (None if math.isnan(self.temporal.mean_iou)
                                          else self.temporal.mean_iou),
            "latency_ms": self.latency(),
            "fps": self.fps(),
            "frames": len(self.frames),
            "frames_with_ground_truth": self.frames_with_ground_truth,
            "frames_without_ground_truth": self.frames_without_ground_truth,
            "stream_resets": {"total": len(self.stream_resets),
                              "reasons": self.stream_resets[:MAX_LISTED_SKIPS]},
            # Each skipped item with its reason; the count and the count per kind.
            "skipped": [asdict(item) for item in self.skipped[:MAX_LISTED_SKIPS]],
            "skipped_count": len(self.skipped),
            "skipped_by_category": self.skipped_by_category(),
            "notes": list(self.notes),
            "class_names": list(self.class_names),
            "confusion_matrix": self.scores.matrix.tolist() if has_truth else None,
        }
