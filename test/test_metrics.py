"""Metrics on hand-made label maps, the official Cityscapes evaluation, temporal consistency."""

from __future__ import annotations

import importlib
import math

import cv2
import numpy as np
import pytest

from tdnet_ros.evaluation.labels import (
    CITYSCAPES_EVAL_LABEL_IDS,
    cityscapes_label_id_to_train_id_lut,
    cityscapes_train_id_to_label_id_lut,
)
from tdnet_ros.metrics import (
    ConfusionCounter,
    SegmentationScores,
    TemporalConsistency,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
    temporal_consistency,
    top_confusions,
)

# 3 classes; ground truth has an ignored pixel (255).
TARGET = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 2, 255]], dtype=np.uint8)
PREDICTION = np.array([[0, 1, 1, 1],
                       [0, 0, 1, 2],
                       [2, 2, 0, 1]], dtype=np.uint8)


def test_confusion_matrix_by_hand():
    matrix = confusion_matrix(PREDICTION, TARGET, num_classes=3)
    # rows: ground truth, columns: prediction; the ignored pixel is not counted.
    expected = np.array([[3, 1, 0],
                         [0, 3, 1],
                         [1, 0, 2]])
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.sum() == 11


def test_iou_accuracy_by_hand():
    matrix = confusion_matrix(PREDICTION, TARGET, num_classes=3)
    # class 0: TP 3, FP 1 (gt 2 -> 0), FN 1  -> 3/5
    # class 1: TP 3, FP 1 (gt 0 -> 1), FN 1  -> 3/5
    # class 2: TP 2, FP 1 (gt 1 -> 2), FN 1  -> 2/4
    np.testing.assert_allclose(iou_per_class(matrix), [0.6, 0.6, 0.5])
    assert mean_iou(matrix) == pytest.approx((0.6 + 0.6 + 0.5) / 3)
    assert pixel_accuracy(matrix) == pytest.approx(8 / 11)


def test_top_confusions_by_hand():
    matrix = confusion_matrix(PREDICTION, TARGET, num_classes=3)
    # class 0: 1 of its 4 pixels predicted 1; class 1: 1 of 4 predicted 2; class 2: 1 of 3 predicted 0
    confusions = top_confusions(matrix)
    assert [[k for k, _ in row] for row in confusions] == [[1], [2], [0]]
    assert [round(f, 4) for row in confusions for _, f in row] == [0.25, 0.25, round(1 / 3, 4)]
    # a class absent from the ground truth has no entry; count caps the list, largest first
    matrix = np.array([[5, 3, 1], [0, 0, 0], [2, 0, 0]])
    assert top_confusions(matrix, count=1) == [[(1, 1 / 3)], [], [(0, 1.0)]]


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    target = np.array([[0, 0], [1, 1]], dtype=np.uint8)
    prediction = np.array([[0, 0], [1, 3]], dtype=np.uint8)
    matrix = confusion_matrix(prediction, target, num_classes=5)
    ious = iou_per_class(matrix)
    # class 2 and 4: in neither -> NaN; class 3: predicted only -> 0; class 1: 1/2.
    assert math.isnan(ious[2]) and math.isnan(ious[4])
    assert ious[3] == 0.0 and ious[1] == 0.5 and ious[0] == 1.0
    assert mean_iou(matrix) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_ignore_and_out_of_range_ground_truth_are_not_counted():
    target = np.array([[255, 7, 0]], dtype=np.uint8)  # 7 is outside 3 classes
    prediction = np.array([[1, 1, 0]], dtype=np.uint8)
    matrix = confusion_matrix(prediction, target, num_classes=3)
    assert matrix.sum() == 1 and matrix[0, 0] == 1


def test_all_ignored_gives_nan():
    target = np.full((2, 2), 255, dtype=np.uint8)
    matrix = confusion_matrix(np.zeros((2, 2), np.uint8), target, num_classes=2)
    assert math.isnan(mean_iou(matrix)) and math.isnan(pixel_accuracy(matrix))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.full((2, 2), 9, np.uint8), np.zeros((2, 2), np.uint8), 2)


def test_accumulator_sums_frames():
    scores = SegmentationScores(num_classes=3)
    first = scores.update(PREDICTION, TARGET)
    scores.update(TARGET.copy() % 255 % 3, TARGET)  # a perfect frame (ignored pixel aside)
    np.testing.assert_array_equal(scores.matrix, first + confusion_matrix(
        TARGET % 255 % 3, TARGET, 3))
    assert scores.frames == 2
    assert scores.pixel_accuracy == pytest.approx((8 + 11) / 22)


# ------------------------------------------------------------------------------------
# Agreement with the official Cityscapes evaluation (cityscapesscripts 2.3.0)
# ------------------------------------------------------------------------------------


def _random_label_map(rng: np.random.Generator, shape: tuple[int, int], classes: int) -> np.ndarray:
    """Blobby train-id maps: smooth noise quantised into classes (like real segmentations)."""
    noise = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 4)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-9)
    return np.minimum((noise * classes).astype(np.uint8), classes - 1)


def test_matches_official_cityscapes_evaluation(tmp_path, monkeypatch):
    cv2_write = cv2.imwrite
    dataset = tmp_path / "cityscapes"
    results_root = tmp_path / "results"
    rng = np.random.default_rng(7)
    to_label_id = cityscapes_train_id_to_label_id_lut()
    to_train_id = cityscapes_label_id_to_train_id_lut()
    ours = SegmentationScores(num_classes=19)
    frames = [("frankfurt", 0, 19), ("frankfurt", 1, 19), ("munster", 5, 294)]
    for city, sequence, frame in frames:
        name = f"{city}_{sequence:06d}_{frame:06d}"
        shape = (96, 192)
        # Ground truth in Cityscapes label ids, including ids that are not evaluated
        # (0 unlabeled, 1 ego vehicle, 4 static) on some pixels.
        truth_train = _random_label_map(rng, shape, 19)
        truth_train[truth_train == 16] = 15  # "train" appears nowhere: NaN for both
        truth_ids = to_label_id[truth_train]
        truth_ids[rng.random(shape) < 0.05] = rng.choice([0, 1, 4])
        # A prediction that is right most of the time, with a few classes never predicted.
        prediction_train = truth_train.copy()
        wrong = rng.random(shape) < 0.3
        prediction_train[wrong] = rng.integers(0, 16, size=int(wrong.sum()))
        prediction_train[truth_train >= 17] = 13  # motorcycle, bicycle: never predicted
        gt_dir = dataset / "gtFine" / "val" / city
        gt_dir.mkdir(parents=True, exist_ok=True)
        cv2_write(str(gt_dir / f"{name}_gtFine_labelIds.png"), truth_ids)
        results_root.mkdir(exist_ok=True)
        cv2_write(str(results_root / f"{name}_pred.png"), to_label_id[prediction_train])
        ours.update(prediction_train, to_train_id[truth_ids])

    monkeypatch.setenv("CITYSCAPES_DATASET", str(dataset))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(results_root))
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", str(tmp_path))
    official = importlib.reload(
        importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    )
    args = official.args
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet = True
    args.predictionPath = None
    args.predictionWalk = None
    import glob

    ground_truths = sorted(glob.glob(args.groundTruthSearch))
    assert len(ground_truths) == len(frames)
    predictions = [official.getPrediction(args, gt) for gt in ground_truths]
    report = official.evaluateImgLists(predictions, ground_truths, args)

    official_classes = report["classScores"]
    names = [official.id2label[label_id].name for label_id in CITYSCAPES_EVAL_LABEL_IDS]
    ious = ours.iou
    for train_id, name in enumerate(names):
        theirs = official_classes[name]
        if math.isnan(theirs):
            assert math.isnan(ious[train_id]), name
        else:
            assert ious[train_id] == pytest.approx(theirs, abs=1e-9), name
    assert ours.mean_iou == pytest.approx(report["averageScoreClasses"], abs=1e-9)
    # Classes 17 and 18 are present but never predicted: IoU 0, counted in the mean;
    # class 16 is in neither: NaN, left out of the mean (in both implementations).
    assert ious[17] == 0.0 and ious[18] == 0.0
    assert math.isnan(ious[16]) and math.isnan(official_classes["train"])


def test_cityscapes_id_tables_match_the_official_label_table():
    from cityscapesscripts.helpers.labels import labels

    to_train_id = cityscapes_label_id_to_train_id_lut()
    for label in labels:
        if 0 <= label.id < 256:
            assert to_train_id[label.id] == label.trainId % 256, label.name


# ------------------------------------------------------------------------------------
# Temporal consistency
# ------------------------------------------------------------------------------------


def _textured_scene(rng: np.random.Generator, shape: tuple[int, int], classes: int):
    """A textured image and a blobby label map of the same (larger) scene."""
    texture = cv2.GaussianBlur(rng.integers(0, 256, shape).astype(np.uint8), (0, 0), 1.5)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX)
    labels = _random_label_map(rng, shape, classes)
    return np.dstack([texture, np.roll(texture, 7, axis=0), texture]), labels


def test_translated_scene_is_consistent_and_flicker_is_not():
    rng = np.random.default_rng(3)
    height, width = 180, 240
    scene, scene_labels = _textured_scene(rng, (height + 40, width + 40), classes=6)
    tracker = TemporalConsistency(flow_max_side=None, num_classes=6)
    for step in range(4):  # the camera pans 3 px right and 2 px down per frame
        y, x = 2 * step, 3 * step
        frame = np.ascontiguousarray(scene[y:y + height, x:x + width])
        labels = np.ascontiguousarray(scene_labels[y:y + height, x:x + width])
        tracker.update(labels, frame)
    assert len(tracker.pair_scores) == 3
    assert tracker.value > 99.0
    assert tracker.mean_iou > 97.0  # the IoU form agrees
    # Without motion compensation the same labels agree far less: the warp matters.
    first, second = scene_labels[:height, :width], scene_labels[2:2 + height, 3:3 + width]
    assert (first == second).mean() * 100 < tracker.value - 5

    # Labels that flicker at random between frames of the same motion agree ~1/6 of the time.
    frame0 = np.ascontiguousarray(scene[:height, :width])
    frame1 = np.ascontiguousarray(scene[2:2 + height, 3:3 + width])
    noise0 = rng.integers(0, 6, (height, width)).astype(np.uint8)
    noise1 = rng.integers(0, 6, (height, width)).astype(np.uint8)
    flicker = temporal_consistency(noise0, noise1, frame0, frame1, flow_max_side=None)
    assert 10.0 < flicker < 25.0
    noisy = TemporalConsistency(flow_max_side=None, num_classes=6)
    noisy.update(noise0, frame0)
    noisy.update(noise1, frame1)
    assert noisy.mean_iou < 15.0  # about 1/11 for independent uniform labels


def test_temporal_consistency_downscaled_flow_and_breaks():
    rng = np.random.default_rng(4)
    height, width = 240, 320
    scene, scene_labels = _textured_scene(rng, (height + 20, width + 20), classes=4)
    frame0, labels0 = scene[:height, :width], scene_labels[:height, :width]
    frame1, labels1 = scene[4:4 + height, 4:4 + width], scene_labels[4:4 + height, 4:4 + width]
    # Flow at half resolution still compensates the motion.
    assert temporal_consistency(labels0, labels1, frame0, frame1, flow_max_side=160) > 97.0
    tracker = TemporalConsistency()
    tracker.update(np.ascontiguousarray(labels0), np.ascontiguousarray(frame0))
    tracker.break_sequence()
    assert tracker.update(np.ascontiguousarray(labels1), np.ascontiguousarray(frame1)) is None
    assert math.isnan(tracker.value)


def test_a_confusion_counter_counts_as_confusion_matrix_frame_by_frame():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 5, (3, 7, 9)).astype(np.uint8)
    target[0, 0] = 255  # ignored
    target[1, 1, :3] = 9  # outside the classes: not counted either
    counter = ConfusionCounter(target, 5)
    for _ in range(2):  # the same counter scores several predictions
        prediction = rng.integers(0, 5, target.shape).astype(np.int16)
        expected = sum(confusion_matrix(p, t, 5) for p, t in zip(prediction, target))
        assert np.array_equal(counter(prediction), expected)
    with pytest.raises(ValueError, match="differs from ground-truth shape"):
        counter(prediction[:2])
    prediction[2, 3, 4] = 7
    with pytest.raises(ValueError, match=r"class ids \[7\] outside 0..4"):
        counter(prediction)
