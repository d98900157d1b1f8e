"""Segmentation metrics: confusion matrix, IoU, pixel accuracy and temporal consistency.

Pure numpy (plus OpenCV for the optical flow of the temporal measure); no torch, no rclpy,
so the offline evaluator, the live evaluator node and the trainer share one implementation.

Conventions, the same as the official Cityscapes evaluation:

* the confusion matrix has ground truth in rows and prediction in columns;
* ground-truth pixels equal to the ignore label (255), or outside ``0..num_classes-1``, are
  not counted at all;
* a class's IoU is ``TP / (TP + FP + FN)``; it is NaN when the class is absent from both the
  ground truth and the prediction (denominator 0), and the mean IoU averages the classes
  whose IoU is not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

IGNORE_LABEL = 255


def _check_label_pair(prediction: np.ndarray, target: np.ndarray) -> None:
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from ground-truth shape {target.shape}"
        )
    if prediction.ndim != 2:
        raise ValueError(f"label maps must be 2-D (H, W), got shape {prediction.shape}")


def confusion_matrix(
    prediction: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
) -> np.ndarray:
    """Confusion matrix of one label map against its ground truth.

    Args:
        prediction: (H, W) integer class ids in ``0..num_classes-1``.
        target: (H, W) integer ground-truth class ids; ``ignore_label`` and ids
            ``>= num_classes`` are left out.
        num_classes: K, the number of evaluated classes.
        ignore_label: the ground-truth value that marks unlabelled pixels.

    Returns:
        (K, K) int64 counts, ``[ground truth, prediction]``.

    Raises:
        ValueError: shapes differ, or a prediction on a counted pixel is outside ``0..K-1``.
    """
    _check_label_pair(prediction, target)
    return ConfusionCounter(target, num_classes, ignore_label)(prediction)


class ConfusionCounter:
    """Confusion matrices of many predictions against one ground truth (`confusion_matrix`'s
    counting). The ground truth's share of the work (which pixels count, their row index) is
    done once, so that each prediction costs one masked gather and one bincount: calibration
    scores hundreds of predictions of the same frames."""

    def __init__(self, target: np.ndarray, num_classes: int, ignore_label: int = IGNORE_LABEL) -> None:
        self.shape, self.num_classes = target.shape, num_classes
        flat = np.asarray(target).ravel()
        self.counted = (flat >= 0) & (flat < num_classes) & (flat != ignore_label)
        self.row_index = flat[self.counted].astype(np.int64) * num_classes  # (counted pixels,)

    def __call__(self, prediction: np.ndarray) -> np.ndarray:
        """(K, K) int64 counts of `prediction` (the ground truth's shape), ground truth in rows."""
        if prediction.shape != self.shape:
            raise ValueError(f"prediction shape {prediction.shape} differs from ground-truth shape {self.shape}")
        k = self.num_classes
        predicted = np.asarray(prediction).ravel()[self.counted].astype(np.int64)
        if predicted.size and (predicted.min() < 0 or predicted.max() >= k):
            bad = np.unique(predicted[(predicted < 0) | (predicted >= k)])
            raise ValueError(f"prediction has class ids {bad[:10].tolist()} outside 0..{k - 1}")
        return np.bincount(self.row_index + predicted, minlength=k * k).reshape(k, k)  # (K gt, K pred)


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """Per-class intersection over union (fraction in 0..1; NaN for classes absent in both)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    false_negative = matrix.sum(axis=1) - true_positive
    false_positive = matrix.sum(axis=0) - true_positive
    denominator = true_positive + false_positive + false_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, true_positive / denominator, np.nan)


def mean_iou(matrix: np.ndarray) -> float:
    """Mean IoU over the classes present in the ground truth or the prediction (NaN if none)."""
    ious = iou_per_class(matrix)
    present = ~np.isnan(ious)
    return float(ious[present].mean()) if present.any() else float("nan")


def top_confusions(matrix: np.ndarray, count: int = 2) -> list[list[tuple[int, float]]]:
    """For each ground-truth class, the `count` other classes its pixels are most often
    predicted as, with the fraction of that class's pixels: ``[[(class, fraction), ...], ...]``.

    Classes that are never confused (or absent from the ground truth) get fewer entries.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    mistaken = matrix.copy()
    np.fill_diagonal(mistaken, 0)  # only the pixels predicted as another class
    result = []
    for row, total in zip(mistaken, matrix.sum(axis=1)):
        largest = np.argsort(-row, kind="stable")[:count]
        result.append([(int(k), float(row[k] / total)) for k in largest if row[k] > 0])
    return result


def pixel_accuracy(matrix: np.ndarray) -> float:
    """Fraction of counted pixels whose predicted class is right (NaN if none counted)."""
    matrix = np.asarray(matrix)
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else float("nan")


@dataclass
class SegmentationScores:
    """Accumulates the confusion matrix over frames.

    Example:
        scores = SegmentationScores(num_classes=19)
        for prediction, target in pairs:
            scores.update(prediction, target)
        scores.mean_iou, scores.iou, scores.pixel_accuracy
    """

    num_classes: int
    ignore_label: int = IGNORE_LABEL
    matrix: np.ndarray = field(init=False)
    frames: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Adds one frame; returns that frame's own confusion matrix."""
        frame_matrix = confusion_matrix(prediction, target, self.num_classes, self.ignore_label)
        self.matrix += frame_matrix
        self.frames += 1
        return frame_matrix

    @property
    def iou(self) -> np.ndarray:
        return iou_per_class(self.matrix)

    @property
    def mean_iou(self) -> float:
        return mean_iou(self.matrix)

    @property
    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.matrix)


# --------------------------------------------------------------------------------------
# Temporal consistency
# --------------------------------------------------------------------------------------


def to_gray(frame: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grayscale of an (H, W, 3) RGB or (H, W) gray uint8 frame."""
    if frame.ndim == 2:
        return frame
    if frame.ndim == 3 and frame.shape[2] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    raise ValueError(f"expected an (H, W, 3) RGB or (H, W) gray frame, got shape {frame.shape}")


def dense_flow(
    from_gray: np.ndarray, to_gray_frame: np.ndarray, max_side: int | None = 640
) -> np.ndarray:
    """Farneback optical flow: for each pixel of ``from_gray``, its displacement into the other.

    Args:
        from_gray: (H, W) uint8 frame the flow is defined on.
        to_gray_frame: (H, W) uint8 frame the flow points into.
        max_side: the flow is computed on frames downscaled so that their longer side is at
            most this (then scaled back up), which keeps large frames cheap; None: full size.

    Returns:
        (H, W, 2) float32 flow (dx, dy) in pixels of the full-size frames.
    """
    if from_gray.shape != to_gray_frame.shape:
        raise ValueError(f"frame shapes differ: {from_gray.shape} vs {to_gray_frame.shape}")
    height, width = from_gray.shape
    scale = 1.0
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        from_gray = cv2.resize(from_gray, small, interpolation=cv2.INTER_AREA)
        to_gray_frame = cv2.resize(to_gray_frame, small, interpolation=cv2.INTER_AREA)
    flow = cv2.calcOpticalFlowFarneback(
        from_gray, to_gray_frame, None,
        pyr_scale=0.5, levels=4, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0,
    )  # (h, w, 2)
    if scale != 1.0:
        flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR) / scale
    return flow.astype(np.float32, copy=False)  # (H, W, 2)


def warp_labels(
    previous_labels: np.ndarray, flow_to_previous: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Warps the previous frame's labels onto the current frame.

    Args:
        previous_labels: (H, W) uint8 labels of the previous frame.
        flow_to_previous: (H, W, 2) flow from the current frame to the previous one.

    Returns:
        ``(warped, valid)``: (H, W) labels seen from the current frame (nearest neighbour, so
        no invented classes) and a boolean mask of pixels whose source lies inside the
        previous frame.
    """
    height, width = previous_labels.shape
    grid_x, grid_y = np.meshgrid(
        np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    )
    map_x = grid_x + flow_to_previous[..., 0]
    map_y = grid_y + flow_to_previous[..., 1]
    warped = cv2.remap(
        previous_labels, map_x, map_y, interpolation=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_LABEL,
    )
    valid = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    return warped, valid


def warp_previous_labels(
    previous_labels: np.ndarray,
    previous_frame: np.ndarray,
    current_frame: np.ndarray,
    flow_max_side: int | None = 640,
) -> tuple[np.ndarray, np.ndarray]:
    """The previous frame's labels seen from the current frame, and where they are valid.

    The flow from the current frame to the previous one (Farneback, on grayscale) maps each
    current pixel to its source in the previous frame; the previous labels are sampled
    there (nearest neighbour).

    Returns:
        ``(warped, valid)``: (H, W) labels and boolean mask (see :func:`warp_labels`).
    """
    previous_gray = to_gray(previous_frame)
    current_gray = to_gray(current_frame)
    if previous_gray.shape != previous_labels.shape or current_gray.shape != previous_gray.shape:
        raise ValueError("frames and label maps must have the same height and width")
    flow = dense_flow(current_gray, previous_gray, max_side=flow_max_side)
    return warp_labels(previous_labels, flow)


def label_agreement(
    previous_labels: np.ndarray,
    current_labels: np.ndarray,
    previous_frame: np.ndarray,
    current_frame: np.ndarray,
    flow_max_side: int | None = 640,
) -> tuple[int, int]:
    """Motion-compensated agreement of two consecutive label maps.

    Returns:
        ``(agreeing, valid)`` pixel counts; the agreement is ``agreeing / valid``.
    """
    if previous_labels.shape != current_labels.shape:
        raise ValueError(
            f"label shapes differ: {previous_labels.shape} vs {current_labels.shape}"
        )
    warped, valid = warp_previous_labels(
        previous_labels, previous_frame, current_frame, flow_max_side
    )
    agreeing = int(np.count_nonzero(valid & (warped == current_labels)))
    return agreeing, int(np.count_nonzero(valid))


def temporal_consistency(
    previous_labels: np.ndarray,
    current_labels: np.ndarray,
    previous_frame: np.ndarray,
    current_frame: np.ndarray,
    flow_max_side: int | None = 640,
) -> float:
    """Percentage of valid pixels on which the warped previous labels equal the current ones."""
    agreeing, valid = label_agreement(
        previous_labels, current_labels, previous_frame, current_frame, flow_max_side
    )
    return 100.0 * agreeing / valid if valid else float("nan")


@dataclass
class TemporalConsistency:
    """Accumulates motion-compensated label agreement over a sequence of frames.

    Feed every frame in order with :meth:`update`; call :meth:`break_sequence` at a
    discontinuity (a gap, a reset, a skipped frame) so that no pair spans it.

    :attr:`value` is the mean over frame pairs of the per-pair pixel agreement (percent).
    With ``num_classes`` set, :attr:`mean_iou` is also kept: the mean IoU between the
    warped previous labels and the current labels over all pairs (the form some video
    segmentation papers report).
    """

    flow_max_side: int | None = 640
    num_classes: int | None = None
    pair_scores: list[float] = field(default_factory=list)
    matrix: np.ndarray | None = field(default=None, repr=False)
    _previous: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.num_classes is not None:
            self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, labels: np.ndarray, frame: np.ndarray) -> float | None:
        """Adds a frame; returns the agreement (percent) with the previous one, if any."""
        gray = to_gray(frame)
        score: float | None = None
        if self._previous is not None and self._previous[0].shape == labels.shape:
            previous_labels, previous_gray = self._previous
            warped, valid = warp_previous_labels(
                previous_labels, previous_gray, gray, self.flow_max_side
            )
            valid_count = int(np.count_nonzero(valid))
            if valid_count:
                agreeing = int(np.count_nonzero(valid & (warped == labels)))
                score = 100.0 * agreeing / valid_count
                self.pair_scores.append(score)
                if self.matrix is not None:
                    # Current labels play the ground truth; invalid pixels are ignored.
                    reference = np.where(valid, labels, IGNORE_LABEL).astype(np.uint8)
                    self.matrix += confusion_matrix(
                        np.where(valid, warped, 0), reference, self.matrix.shape[0]
                    )
        self._previous = (labels.copy(), gray.copy())
        return score

    def break_sequence(self) -> None:
        """Forgets the previous frame: the next frame starts a new sequence."""
        self._previous = None

    @property
    def value(self) -> float:
        """Mean agreement over all pairs, percent (NaN when no pair was seen)."""
        return float(np.mean(self.pair_scores)) if self.pair_scores else float("nan")

    @property
    def mean_iou(self) -> float:
        """Mean IoU (percent) of warped previous vs current labels (NaN if not kept)."""
        if self.matrix is None or not self.matrix.any():
            return float("nan")
        return 100.0 * mean_iou(self.matrix)
