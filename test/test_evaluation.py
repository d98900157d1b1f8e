"""Offline evaluation of recordings written here with rosbags, through a real (tiny) model.

The model has random weights, so its labels mean nothing, but every step is the real one:
bag reading and decoding, the segmenter, metrics, report, figures, video and output bag.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tdnet_ros import ModelConfig, Segmenter, build_model, save_checkpoint
from tdnet_ros.evaluation import BagError, OfflineSettings, Recording, evaluate_offline
from tdnet_ros.cli.evaluate import main as tdnet_eval
from tdnet_ros.evaluation.labels import cityscapes_train_id_to_label_id_lut

HEIGHT, WIDTH = 72, 96
CAMERA = "/camera/image_raw"
TRUTH = "/camera/labels_gt"
START_NS = 1_700_000_000 * 1_000_000_000
PERIOD_NS = 100_000_000  # 10 Hz


# ------------------------------------------------------------------------------------
# Fixtures: a tiny model, and recordings written with rosbags
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "td4-tiny.pt"
    save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), path)
    return path


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> Segmenter:
    return Segmenter.from_checkpoint(checkpoint, device="cpu")


def moving_scene(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB frames of a textured scene panning right, and blobby class-id maps (0..18)."""
    rng = np.random.default_rng(seed)
    big = (HEIGHT + 10, WIDTH + 4 * count)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (*big, 3)).astype(np.uint8), (0, 0), 1.2)
    field = cv2.GaussianBlur(rng.random(big).astype(np.float32), (0, 0), 6)
    labels = ((field - field.min()) / (np.ptp(field) + 1e-9) * 18.99).astype(np.uint8)
    frames = [np.ascontiguousarray(texture[5:5 + HEIGHT, 4 * i:4 * i + WIDTH])
              for i in range(count)]
    truths = [np.ascontiguousarray(labels[5:5 + HEIGHT, 4 * i:4 * i + WIDTH])
              for i in range(count)]
    return frames, truths


class BagWriter:
    """Writes sensor_msgs/Image and CompressedImage messages into a rosbag2 or ROS 1 bag."""

    def __init__(self, path: Path, storage: str = "mcap") -> None:
        from rosbags.typesys import Stores, get_typestore

        self.storage = storage
        if storage == "ros1":
            from rosbags.rosbag1 import Writer

            self.typestore = get_typestore(Stores.ROS1_NOETIC)
            self.writer = Writer(path)
        else:
            from rosbags.rosbag2 import StoragePlugin, Writer

            self.typestore = get_typestore(Stores.LATEST)
            plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
            self.writer = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=plugin)
        self.writer.open()
        self.connections: dict[str, object] = {}

    def _header(self, stamp_ns: int):
        types = self.typestore.types
        stamp = types["builtin_interfaces/msg/Time"](
            sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
        if self.storage == "ros1":
            return types["std_msgs/msg/Header"](seq=0, stamp=stamp, frame_id="camera")
        return types["std_msgs/msg/Header"](stamp=stamp, frame_id="camera")

    def _write(self, topic: str, msgtype: str, message, stamp_ns: int) -> None:
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(
                topic, msgtype, typestore=self.typestore)
        if self.storage == "ros1":
            raw = self.typestore.serialize_ros1(message, msgtype)
        else:
            raw = self.typestore.serialize_cdr(message, msgtype)
        self.writer.write(self.connections[topic], stamp_ns, raw)

    def image(self, topic: str, stamp_ns: int, pixels: np.ndarray, encoding: str,
              height: int | None = None, width: int | None = None, step: int | None = None,
              bag_time_ns: int | None = None) -> None:
        pixels = np.ascontiguousarray(pixels)
        height = pixels.shape[0] if height is None else height
        width = pixels.shape[1] if width is None else width
        if step is None:
            step = pixels.shape[1] * (pixels.shape[2] if pixels.ndim == 3 else 1) * pixels.itemsize
        message = self.typestore.types["sensor_msgs/msg/Image"](
            header=self._header(stamp_ns), height=height, width=width, encoding=encoding,
            is_bigendian=0, step=step, data=pixels.view(np.uint8).reshape(-1))
        self._write(topic, "sensor_msgs/msg/Image", message, bag_time_ns or stamp_ns)

    def compressed(self, topic: str, stamp_ns: int, rgb: np.ndarray) -> None:
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        message = self.typestore.types["sensor_msgs/msg/CompressedImage"](
            header=self._header(stamp_ns), format="jpeg", data=jpeg.reshape(-1))
        self._write(topic, "sensor_msgs/msg/CompressedImage", message, stamp_ns)

    def close(self) -> None:
        self.writer.close()


def encode(rgb: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "rgb8":
        return rgb
    if encoding == "bgr8":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if encoding == "mono8":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    raise ValueError(encoding)


def write_sequence(path: Path, storage: str, encoding: str, count: int = 6,
                   with_truth: bool = True, compressed: bool = False) -> tuple[list, list]:
    frames, truths = moving_scene(count)
    bag = BagWriter(path, storage)
    for i, (rgb, truth) in enumerate(zip(frames, truths)):
        stamp = START_NS + i * PERIOD_NS
        # Ground truth is recorded a little after its frame, as a labelling node would.
        if compressed:
            bag.compressed(CAMERA, stamp, rgb)
        else:
            bag.image(CAMERA, stamp, encode(rgb, encoding), encoding)
        if with_truth:
            bag.image(TRUTH, stamp, truth, "mono8", bag_time_ns=stamp + 5_000_000)
    bag.close()
    return frames, truths


def settings(**overrides) -> OfflineSettings:
    values = dict(image_topic=CAMERA, label_topic=TRUTH, progress=False)
    values.update(overrides)
    return OfflineSettings(**values)


# ------------------------------------------------------------------------------------
# Offline evaluation over storage formats and encodings
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage,encoding", [
    ("mcap", "rgb8"), ("sqlite3", "bgr8"), ("mcap", "mono8"), ("sqlite3", "jpeg"),
    ("ros1", "rgb8"),
])
def test_offline_evaluation_formats_and_encodings(tmp_path, segmenter, storage, encoding):
    bag_path = tmp_path / ("recording.bag" if storage == "ros1" else "recording")
    frames, truths = write_sequence(bag_path, storage, encoding, count=5,
                                    compressed=encoding == "jpeg")
    result = evaluate_offline(bag_path, segmenter, settings())
    recorder = result.recorder
    assert len(recorder.frames) == 5
    assert recorder.frames_with_ground_truth == 5
    assert recorder.skipped == []
    # The predictions equal those of the segmenter run directly on the decoded frames.
    segmenter.reset("direct")
    expected = np.zeros((19, 19), dtype=np.int64)
    from tdnet_ros.metrics import confusion_matrix

    for rgb, truth in zip(frames, truths):
        if encoding == "mono8":
            rgb = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        if encoding == "jpeg":
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            rgb = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        labels = segmenter.segment(rgb, stream="direct").labels
        expected += confusion_matrix(labels, truth, 19)
    np.testing.assert_array_equal(recorder.scores.matrix, expected)
    summary = recorder.summary()
    assert 0.0 <= summary["miou"] <= 100.0
    assert summary["temporal_pairs"] == 4
    assert 0.0 <= summary["temporal_consistency"] <= 100.0
    assert set(summary["latency_ms"]["total"]) >= {"p50", "p95", "p99"}


def test_more_encodings_padding_and_16_bit_labels(tmp_path, segmenter):
    frames, truths = moving_scene(4)
    bag_path = tmp_path / "mixed"
    bag = BagWriter(bag_path, "sqlite3")
    t = [START_NS + i * PERIOD_NS for i in range(4)]
    alpha = np.full((HEIGHT, WIDTH, 1), 255, np.uint8)
    bag.image(CAMERA, t[0], np.concatenate([frames[0], alpha], axis=2), "rgba8")
    bag.image(CAMERA, t[1], np.concatenate([frames[1][..., ::-1], alpha], axis=2), "bgra8")
    gray16 = cv2.cvtColor(frames[2], cv2.COLOR_RGB2GRAY).astype("<u2") * 257  # 8 -> 16 bit
    bag.image(CAMERA, t[2], gray16.view(np.uint8), "mono16", width=WIDTH, step=WIDTH * 2)
    padded = np.zeros((HEIGHT, WIDTH * 3 + 16), np.uint8)  # rows padded by 16 bytes
    padded[:, : WIDTH * 3] = frames[3].reshape(HEIGHT, -1)
    bag.image(CAMERA, t[3], padded, "rgb8", width=WIDTH, step=WIDTH * 3 + 16)
    for stamp, truth in zip(t, truths):
        bag.image(TRUTH, stamp, truth.astype("<u2").view(np.uint8), "16UC1", width=WIDTH,
                  step=WIDTH * 2)
    bag.close()
    result = evaluate_offline(bag_path, segmenter, settings())
    assert result.recorder.skipped == []
    assert len(result.recorder.frames) == 4
    assert result.recorder.frames_with_ground_truth == 4
    assert result.recorder.scores.matrix.sum() == 4 * HEIGHT * WIDTH


def test_bad_content_is_skipped_counted_and_named(tmp_path, segmenter):
    frames, truths = moving_scene(8)
    bag_path = tmp_path / "bad"
    bag = BagWriter(bag_path, "mcap")
    t = [START_NS + i * PERIOD_NS for i in range(8)]
    bag.image(CAMERA, t[0], frames[0], "rgb8")
    bag.image(TRUTH, t[0], truths[0], "mono8")
    bag.image(CAMERA, t[1], frames[1][:10], "rgb8", height=HEIGHT)  # truncated data
    bag.image(CAMERA, t[2], frames[2], "weird42")  # unknown encoding
    bag.image(CAMERA, t[3], frames[3], "rgb8")
    bag.image(TRUTH, t[3], truths[3][:, :50], "mono8")  # label of the wrong size
    bag.image(CAMERA, t[1] - 1, frames[4], "rgb8", bag_time_ns=t[4])  # stamp goes back
    bag.image(CAMERA, t[5], frames[5], "rgb8")
    bag.image(TRUTH, t[5], truths[5], "mono16")  # wrong dtype for mono16 data: truncated
    bag.image(CAMERA, t[6], frames[6][:, :, 0], "mono8")
    bag.image(TRUTH, t[6], truths[6], "mono8")
    bag.image(TRUTH, t[7] + 3 * PERIOD_NS, truths[7], "mono8")  # matches no frame
    bag.close()

    result = evaluate_offline(bag_path, segmenter, settings())
    recorder = result.recorder
    assert [f.index for f in recorder.frames] == [0, 3, 5, 6]
    assert recorder.frames_with_ground_truth == 2  # frames 0 and 6
    categories = sorted(item.category for item in recorder.skipped)
    assert categories == sorted(["decode", "decode", "stamp_backwards", "label_size_mismatch",
                                 "label", "label_unmatched"])
    reasons = {item.item + " " + item.category: item.reason for item in recorder.skipped}
    assert "bytes" in reasons["#1 decode"]  # truncated: names the byte counts
    assert "weird42" in reasons["#2 decode"]
    assert "before the previous frame" in reasons["#4 stamp_backwards"]
    assert "96x72" in reasons["#3 label_size_mismatch"]

    out = tmp_path / "report"
    from tdnet_ros.cli.evaluate import write_offline_report
    from tdnet_ros.evaluation.report import Provenance

    provenance = Provenance("td4-tiny", "x.pt", "ab" * 32, "cpu", "float32", "pytest")
    results = write_offline_report(result, provenance, out)
    assert results["skipped_count"] == len(results["skipped"]) == 6
    assert results["skipped_by_category"]["decode"] == 2
    assert {"source", "item", "stamp_ns", "category", "reason"} <= set(results["skipped"][0])
    report = (out / "report.md").read_text()
    assert "weird42" in report and "stamp_backwards" in report


def test_missing_label_topic_is_named_not_fatal(tmp_path, segmenter):
    bag_path = tmp_path / "nolabels"
    write_sequence(bag_path, "mcap", "rgb8", count=3, with_truth=False)
    result = evaluate_offline(bag_path, segmenter, settings())
    recorder = result.recorder
    assert len(recorder.frames) == 3 and recorder.frames_with_ground_truth == 0
    (item,) = recorder.skipped
    assert item.category == "label_topic_missing"
    assert TRUTH in item.reason and CAMERA in item.reason  # names it and lists the topics
    summary = recorder.summary()
    assert summary["miou"] is None and summary["per_class_iou"] == {}
    with pytest.raises(BagError, match=CAMERA):
        evaluate_offline(bag_path, segmenter, settings(require_labels=True))


def test_gap_resets_temporal_state(tmp_path, segmenter):
    frames, _ = moving_scene(4)
    bag_path = tmp_path / "gap"
    bag = BagWriter(bag_path, "sqlite3")
    for i, stamp in enumerate([0, 1, 30, 31]):  # 2.9 s gap between frames 1 and 2
        bag.image(CAMERA, START_NS + stamp * PERIOD_NS, frames[i], "rgb8")
    bag.close()
    result = evaluate_offline(bag_path, segmenter, settings(label_topic=None))
    assert len(result.recorder.stream_resets) == 1
    assert "gap of 2.900 s" in result.recorder.stream_resets[0]
    assert len(result.recorder.temporal.pair_scores) == 2  # (0,1) and (2,3), none across


def test_stream_timeline_rules():
    from tdnet_ros.evaluation.offline import StreamTimeline

    timeline = StreamTimeline(max_gap_s=0.5)
    second = 1_000_000_000
    assert timeline.check(None, "cam")[0] == "no_stamp"
    assert timeline.check(10 * second, "cam") == ("", "")
    assert timeline.check(10 * second, "cam")[0] == "duplicate_stamp"
    assert timeline.check(9 * second, "cam")[0] == "stamp_backwards"
    assert timeline.check(10 * second + second // 10, "cam") == ("", "")
    assert "gap of 1.000 s" in timeline.check(11 * second + second // 10, "cam")[1]
    assert "frame_id changed" in timeline.check(11 * second + second // 5, "left")[1]


def test_label_folder_cityscapes_style(tmp_path, segmenter):
    bag_path = tmp_path / "rec"
    frames, truths = write_sequence(bag_path, "mcap", "rgb8", count=4, with_truth=False)
    folder = tmp_path / "gtFine" / "val" / "street"
    folder.mkdir(parents=True)
    to_label_id = cityscapes_train_id_to_label_id_lut()
    # Frames 1 and 3 annotated; frame numbers in the names start at 100.
    cv2.imwrite(str(folder / "street_000000_000101_gtFine_labelIds.png"), to_label_id[truths[1]])
    cv2.imwrite(str(folder / "street_000000_000103_gtFine_labelTrainIds.png"), truths[3])
    result = evaluate_offline(bag_path, segmenter, settings(
        label_topic=None, label_dir=tmp_path / "gtFine", label_index_offset=100))
    recorder = result.recorder
    assert recorder.frames_with_ground_truth == 2
    assert recorder.skipped == []
    predicted = [f for f in recorder.frames if f.miou is not None]
    assert [f.index for f in predicted] == [1, 3]

    # Files named by header stamp; one name matches no frame and is reported.
    by_stamp = tmp_path / "by_stamp"
    by_stamp.mkdir()
    cv2.imwrite(str(by_stamp / f"{START_NS + 2 * PERIOD_NS}.png"), truths[2])
    cv2.imwrite(str(by_stamp / f"{START_NS + 7}.png"), truths[0])
    result = evaluate_offline(bag_path, segmenter, settings(
        label_topic=None, label_dir=by_stamp, label_match="stamp"))
    assert [f.index for f in result.recorder.frames if f.miou is not None] == [2]
    assert [s.category for s in result.recorder.skipped] == ["label_unmatched"]


def test_unreadable_bag_and_missing_topic_fail_clearly(tmp_path, segmenter):
    broken = tmp_path / "broken.bag"
    broken.write_bytes(b"not a bag at all")
    with pytest.raises(BagError, match="cannot read recording"):
        evaluate_offline(broken, segmenter, settings())
    with pytest.raises(BagError, match="does not exist"):
        evaluate_offline(tmp_path / "nowhere", segmenter, settings())
    bag_path = tmp_path / "rec"
    write_sequence(bag_path, "mcap", "rgb8", count=2)
    with pytest.raises(BagError) as error:
        evaluate_offline(bag_path, segmenter, settings(image_topic="/front/image"))
    message = str(error.value)
    assert "/front/image" in message and CAMERA in message and TRUTH in message
    with Recording(bag_path) as recording:
        assert {t.name for t in recording.topics()} == {CAMERA, TRUTH}
    # A storage file cut in half (power loss): what is complete is evaluated, the loss said.
    storage_file = next(bag_path.glob("*.mcap"))
    whole = storage_file.read_bytes()
    storage_file.write_bytes(whole[: len(whole) // 2])
    result = evaluate_offline(bag_path, segmenter, settings())
    damaged = [s for s in result.recorder.skipped if s.category == "recording_damaged"]
    assert len(damaged) == 1 and "messages lost" in damaged[0].reason
    # Cut before its first complete record: unreadable, and the error lists the topics of
    # its metadata.
    storage_file.write_bytes(whole[:20])
    with pytest.raises(BagError, match="cannot read recording") as error:
        evaluate_offline(bag_path, segmenter, settings())
    assert CAMERA in str(error.value) and "metadata.yaml" in str(error.value)


# ------------------------------------------------------------------------------------
# The command line: output folder, JSON, figures, video, prediction bag
# ------------------------------------------------------------------------------------


def test_cli_writes_report_json_plots_video_and_bag(tmp_path, checkpoint, capsys):
    bag_path = tmp_path / "rec"
    write_sequence(bag_path, "mcap", "bgr8", count=6)
    out = tmp_path / "out"
    json_path = tmp_path / "results.json"
    prediction_bag = tmp_path / "with_predictions"
    status = tdnet_eval([
        str(bag_path), "--image-topic", CAMERA, "--label-topic", TRUTH, "--out", str(out),
        "--json", str(json_path), "--checkpoint", str(checkpoint), "--model", "td4-tiny",
        "--device", "cpu", "--no-progress", "--output-bag", str(prediction_bag),
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and str(out.resolve()) in printed

    results = json.loads(json_path.read_text())
    for key in ("miou", "per_class_iou", "pixel_accuracy", "temporal_consistency",
                "latency_ms", "fps", "frames", "skipped", "model", "checkpoint_sha256",
                "device", "precision", "command"):
        assert key in results, key
    assert results["frames"] == 6
    assert results["model"] == "td4-tiny" and results["device"] == "cpu"
    from tdnet_ros.checkpoint import file_sha256

    assert results["checkpoint_sha256"] == file_sha256(checkpoint)
    assert results["command"].startswith("tdnet-eval ")
    assert set(results["per_class_iou"]) == set(Segmenter.from_checkpoint(checkpoint).class_names)
    assert {"p50", "p95", "p99"} <= set(results["latency_ms"]["total"])
    assert results["latency_ms"]["p95"] == results["latency_ms"]["total"]["p95"]
    assert len(results["latency_ms"]) > 1  # per-stage timings from the segmenter

    for name in ("report.md", "results.json", "per_class_iou.png", "latency_histogram.png",
                 "per_frame.png", "overlay.mp4"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert cv2.imread(str(out / "per_class_iou.png")) is not None
    video = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 6
    assert int(video.get(cv2.CAP_PROP_FRAME_WIDTH)) == 3 * WIDTH  # camera | ground truth | prediction
    report = (out / "report.md").read_text()
    # Model, checkpoint hash, device, precision and command once, at the top (the figures
    # carry them in their footers).
    assert report.count(results["checkpoint_sha256"]) == 1 and report.index(results["checkpoint_sha256"]) < 400
    assert report.count("*Command* `tdnet-eval") == 1
    assert "float32" in report

    with Recording(prediction_bag) as recording:
        topics = {t.name: t.count for t in recording.topics()}
        assert topics == {CAMERA: 6, TRUTH: 6, "/camera/segmentation/labels": 6}
        labels = list(recording.labels("/camera/segmentation/labels"))
    assert all(frame.data.shape == (HEIGHT, WIDTH) for frame in labels)
    assert [f.stamp_ns for f in labels] == [START_NS + i * PERIOD_NS for i in range(6)]


def test_cli_errors_list_the_topics(tmp_path, checkpoint, capsys):
    bag_path = tmp_path / "rec"
    write_sequence(bag_path, "sqlite3", "rgb8", count=2)
    status = tdnet_eval([str(bag_path), "--image-topic", "/nope", "--checkpoint",
                         str(checkpoint), "--no-progress", "--out", str(tmp_path / "o")])
    assert status == 2
    error = capsys.readouterr().err
    assert "/nope" in error and CAMERA in error and TRUTH in error
    status = tdnet_eval([str(tmp_path / "missing"), "--image-topic", CAMERA])
    assert status == 2
    assert "does not exist" in capsys.readouterr().err
    assert tdnet_eval([str(bag_path), "--list-topics"]) == 0
    assert CAMERA in capsys.readouterr().out


# ------------------------------------------------------------------------------------
# Live mode: the recording played over DDS into segmenter_node in its own process
# ------------------------------------------------------------------------------------


def test_live_evaluation_over_dds(tmp_path, checkpoint, segmenter, capsys):
    pytest.importorskip("rclpy")
    # Camera-sized frames (the shared note: small images hide the large-data trap).
    rng = np.random.default_rng(5)
    scene = cv2.GaussianBlur(rng.integers(0, 256, (520, 720, 3)).astype(np.uint8), (0, 0), 1.5)
    field = cv2.GaussianBlur(rng.random((520, 720)).astype(np.float32), (0, 0), 20)
    scene_labels = ((field - field.min()) / (np.ptp(field) + 1e-9) * 18.99).astype(np.uint8)
    bag_path = tmp_path / "live"
    bag = BagWriter(bag_path, "mcap")
    count = 8
    for i in range(count):
        stamp = START_NS + i * 200_000_000  # 5 Hz
        rgb = np.ascontiguousarray(scene[10:490, 8 * i:8 * i + 640])
        bag.image(CAMERA, stamp, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "bgr8")
        bag.image(TRUTH, stamp, scene_labels[10:490, 8 * i:8 * i + 640], "mono8",
                  bag_time_ns=stamp + 2_000_000)
    bag.close()

    out = tmp_path / "out"
    status = tdnet_eval([
        str(bag_path), "--image-topic", CAMERA, "--label-topic", TRUTH, "--live",
        "--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(out), "--no-progress",
    ])
    log = (out / "node.log").read_text() if (out / "node.log").exists() else ""
    assert status == 0, capsys.readouterr().err + log
    printed = capsys.readouterr().out
    assert "dropped frames" in printed and "end-to-end" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "live"
    assert results["published_frames"] == count
    assert results["frames"] + results["dropped_frames"] == count
    assert results["frames"] >= 1
    assert results["node_exit_code"] == 0
    assert {"p50", "p95", "p99"} <= set(results["end_to_end_latency_ms"])
    assert results["end_to_end_latency_ms"]["p50"] > 0
    assert "backbone" in results["latency_ms"]  # the node's stage timings arrived
    assert results["frames_with_ground_truth"] == results["frames"]
    for name in ("report.md", "per_class_iou.png", "latency_histogram.png", "per_frame.png",
                 "overlay.mp4"):
        assert (out / name).is_file(), name
    if results["dropped_frames"] == 0:
        # Every frame went through the node in order: its labels are the core's labels.
        offline = evaluate_offline(bag_path, segmenter, settings())
        assert results["confusion_matrix"] == offline.recorder.scores.matrix.tolist()


# ------------------------------------------------------------------------------------
# The published Cityscapes protocol, on a tiny tree in the dataset's layout
# ------------------------------------------------------------------------------------


def test_cityscapes_sequence_protocol_on_a_tiny_tree(tmp_path, checkpoint, segmenter):
    from tdnet_ros.evaluation.cityscapes import evaluate_cityscapes
    from tdnet_ros.metrics import confusion_matrix

    root = tmp_path / "cityscapes"
    to_label_id = cityscapes_train_id_to_label_id_lut()
    warmup = 3
    frames, truths = moving_scene(warmup + 1, seed=1)
    expected = np.zeros((19, 19), dtype=np.int64)
    for city, annotated in (("aachen", 19), ("bremen", 119)):
        sequence_dir = root / "leftImg8bit_sequence" / "val" / city
        truth_dir = root / "gtFine" / "val" / city
        sequence_dir.mkdir(parents=True)
        truth_dir.mkdir(parents=True)
        # The snippet's frames before the annotated one (only `warmup` of them are used).
        for offset, rgb in enumerate(frames):
            number = annotated - warmup + offset
            cv2.imwrite(str(sequence_dir / f"{city}_000001_{number:06d}_leftImg8bit.png"),
                        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(truth_dir / f"{city}_000001_{annotated:06d}_gtFine_labelIds.png"),
                    to_label_id[truths[-1]])
        segmenter.reset("reference")
        for rgb in frames:
            labels = segmenter.segment(rgb, stream="reference").labels
        expected += confusion_matrix(labels, truths[-1], 19)
    # An annotation whose sequence frames are missing: skipped and named.
    (root / "gtFine" / "val" / "cologne").mkdir()
    cv2.imwrite(str(root / "gtFine" / "val" / "cologne" /
                    "cologne_000002_000019_gtFine_labelIds.png"), to_label_id[truths[-1]])

    result = evaluate_cityscapes(root, segmenter, warmup_frames=warmup, progress=False)
    recorder = result.recorder
    assert recorder.frames_with_ground_truth == 2
    assert len(recorder.frames) == 2 * (warmup + 1)
    np.testing.assert_array_equal(recorder.scores.matrix, expected)
    (skipped,) = recorder.skipped
    assert skipped.category == "missing_frames" and skipped.item == "cologne_000002_000019"
    # Each annotated frame ran on the same sub-network: warm-up count mod N.
    annotated_paths = {f.path for f in recorder.frames if f.miou is not None}
    assert annotated_paths == {warmup % segmenter.config.num_paths}
    # Snippets are separate sequences: no temporal pair spans two snippets.
    assert len(recorder.temporal.pair_scores) == 2 * warmup

    out = tmp_path / "out"
    assert tdnet_eval([str(root), "--cityscapes", "--warmup-frames", str(warmup),
                       "--checkpoint", str(checkpoint), "--out", str(out),
                       "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "cityscapes" and results["frames_with_ground_truth"] == 2
    assert (out / "report.md").is_file() and (out / "per_class_iou.png").is_file()


def test_live_evaluation_of_a_compressed_topic(tmp_path, checkpoint):
    pytest.importorskip("rclpy")
    rng = np.random.default_rng(6)
    scene = cv2.GaussianBlur(rng.integers(0, 256, (480, 700, 3)).astype(np.uint8), (0, 0), 2)
    bag_path = tmp_path / "jpeg"
    bag = BagWriter(bag_path, "sqlite3")
    topic = "/front/jpeg"  # a CompressedImage topic without the /compressed suffix
    for i in range(4):
        bag.compressed(topic, START_NS + i * PERIOD_NS, np.ascontiguousarray(
            scene[:, 10 * i:10 * i + 640]))
    bag.close()
    out = tmp_path / "out"
    status = tdnet_eval([str(bag_path), "--image-topic", topic, "--live", "--checkpoint",
                         str(checkpoint), "--out", str(out), "--no-progress", "--no-video"])
    assert status == 0, (out / "node.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["published_frames"] == 4
    assert results["frames"] >= 1 and results["frames"] + results["dropped_frames"] == 4
    assert results["miou"] is None and results["frames_with_ground_truth"] == 0


def test_standalone_player_publishes_the_recording(tmp_path):
    pytest.importorskip("rclpy")
    from sensor_msgs.msg import Image

    from tdnet_ros.ros.testing import GraphClient, pick_domain_id, ros_environment

    bag_path = tmp_path / "rec"
    write_sequence(bag_path, "mcap", "rgb8", count=5)
    domain = pick_domain_id()
    client = GraphClient("player_listener", domain)
    try:
        cameras = client.subscribe(Image, CAMERA, 10)
        truths = client.subscribe(Image, TRUTH, 10)
        # Keep the player waiting for the subscriber: play in a loop, stop once received.
        player = subprocess.Popen(
            [sys.executable, "-m", "tdnet_ros.evaluation.live", str(bag_path), "--loop",
             "--rate", "5"], env=ros_environment(domain), stderr=subprocess.PIPE)
        try:
            assert cameras.wait_count(5, timeout=60), player.stderr
            assert truths.wait_count(5, timeout=10)
        finally:
            player.terminate()
            player.wait(10)
    finally:
        client.close()
    message = cameras.messages[-1]
    assert (message.height, message.width, message.encoding) == (HEIGHT, WIDTH, "rgb8")
    # Stamps are on the wall clock, and a label keeps its frame's stamp.
    stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in cameras.messages}
    assert all(abs(sec - time.time()) < 120 for sec, _ in stamps)
    assert {(m.header.stamp.sec, m.header.stamp.nanosec) for m in truths.messages} & stamps


def test_node_cache_resets_are_the_nodes_own_count():
    from tdnet_ros.evaluation.live import node_cache_resets

    # Warm-up timings may not reach the evaluator: the count is the node's running total.
    assert node_cache_resets({1: {"cache_resets": 1}, 2: {"cache_resets": 1}, 3: {"cache_resets": 2}}) == 2
    assert node_cache_resets({}) is None


def test_live_mode_passes_the_runtime_to_the_node_as_its_parameters():
    """The node gets every runtime setting that differs from its own default; its scales as a
    double array (rcl refuses a list of mixed ints and doubles, test_node_lifecycle parses it)."""
    from tdnet_ros.evaluation.live import LiveSettings, node_arguments
    from tdnet_ros.runtime import RuntimeConfig

    runtime = RuntimeConfig(device="cpu", input_size=(256, 512), scales=(1.0, 1.5))
    arguments = node_arguments(LiveSettings(image_topic="/camera/image_raw", runtime=runtime), "/live/image")
    pairs = [arguments[i + 1] for i, argument in enumerate(arguments) if argument == "-p"]
    assert {"device:=cpu", "input_size:=256x512", "scales:=[1.0, 1.5]"} <= set(pairs)
    assert arguments[:2] == ["-r", "image:=/live/image"]
    one_scale = node_arguments(LiveSettings(image_topic="/camera/image_raw", runtime=RuntimeConfig(device="cpu")), "/x")
    assert not any(argument.startswith("scales") for argument in one_scale)
