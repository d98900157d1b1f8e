"""Class logit offsets: the search, folding them into a checkpoint, and the command."""

import cv2
import numpy as np
import pytest
import torch

from tdnet_ros.checkpoint import load_model, read_checkpoint, save_checkpoint
from tdnet_ros.config import ModelConfig
from tdnet_ros.model import build_model
from tdnet_ros.preprocess import labels_from_logits
from tdnet_ros.segmenter import Segmenter
from tdnet_ros.training import calibrate
from tdnet_ros.metrics import mean_iou
from tdnet_ros.training.calibrate import collect_logits, dataset_clips, fold_offsets, pixel_step, search_offsets
from tdnet_ros.training.datasets import CityscapesClips

from test_training_data import make_camvid


def _iou_by_hand(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    ious = []
    for k in range(num_classes):
        union = np.logical_or(predicted == k, labels == k).sum()
        if union:
            ious.append(np.logical_and(predicted == k, labels == k).sum() / union)
    return float(np.mean(ious))


def test_the_search_undoes_a_class_the_logits_hold_back():
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 24, 32), np.uint8)
    for frame in labels:  # a frequent class 1 and a rare class 2 on a background of class 0
        y, x = rng.integers(0, 12, 2)
        frame[y:y + 12, x:x + 16] = 1
        y, x = rng.integers(0, 20, 2)
        frame[y:y + 4, x:x + 4] = 2
    num_classes = 4  # class 3 never appears
    one_hot = np.eye(num_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2)  # (F, K, H, W)
    logits = 2.0 * one_hot + rng.normal(0.0, 0.8, one_hot.shape).astype(np.float32)
    logits[:, 2] -= 1.5  # the model under-predicts class 2
    logits = torch.from_numpy(logits)

    offsets, before, after = search_offsets(logits, labels)

    assert mean_iou(before) == pytest.approx(_iou_by_hand(logits.argmax(1).numpy(), labels, num_classes))
    shifted = (logits + offsets.view(1, -1, 1, 1)).argmax(1).numpy()
    assert mean_iou(after) == pytest.approx(_iou_by_hand(shifted, labels, num_classes))
    assert mean_iou(after) > mean_iou(before) + 0.02
    assert float(offsets[2]) >= 1.0 and float(offsets[2]) == float(offsets.max())  # class 2 is pushed back up most
    assert float(offsets[3]) == 0.0  # absent from the labels: left alone
    assert after.sum() == before.sum() == labels.size


def test_folded_offsets_add_to_every_sub_networks_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny")).eval()
    original = save_checkpoint(model, tmp_path / "original.pt")
    offsets = torch.linspace(-1.0, 1.0, model.config.num_classes)
    calibrated = save_checkpoint(fold_offsets(load_model(original), offsets), tmp_path / "calibrated.pt")
    plain, shifted = Segmenter.from_checkpoint(original), Segmenter.from_checkpoint(calibrated)
    rng = np.random.default_rng(1)
    paths = set()
    for _ in range(model.config.num_paths + 2):  # every sub-network, with the cache cold and warm
        frame = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
        a, b = plain.segment(frame), shifted.segment(frame)
        paths.add(a.path)
        torch.testing.assert_close(b.logits, a.logits + offsets.view(-1, 1, 1), atol=1e-5, rtol=1e-5)
        expected = labels_from_logits((a.logits + offsets.view(-1, 1, 1))[None], plain.model_input_size((64, 128)),
                                      (64, 128), align_corners=model.config.upsample_align_corners)
        assert (b.labels == expected.numpy()).mean() > 0.999  # ties may round either way
    assert paths == set(range(model.config.num_paths))


def test_the_command_writes_a_calibrated_checkpoint_and_a_second_calibration_adds_up(tmp_path, capsys):
    torch.manual_seed(0)
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    target = tmp_path / "calibrated.pt"
    args = ["--seeds", "3", "--frames", "2", "--width", "64", "--height", "32", "--threads", "1"]

    assert calibrate.main([str(source), str(target), *args]) == 0
    out = capsys.readouterr().out
    assert "validation mIoU" in out and f"wrote {target}" in out
    content = read_checkpoint(target)
    stored = content["calibration"]
    assert len(stored["offsets"]) == 19 and stored["seeds"] == [3]
    assert stored["val_miou_after"] >= stored["val_miou_before"]
    expected = fold_offsets(load_model(source), torch.tensor(stored["offsets"])).state_dict()
    for key, value in load_model(target).state_dict().items():
        torch.testing.assert_close(value, expected[key])

    again = tmp_path / "again.pt"
    assert calibrate.main([str(target), str(again), *args, "--seeds", "4"]) == 0
    assert "calibrated before" in capsys.readouterr().out
    total = torch.tensor(read_checkpoint(again)["calibration"]["offsets"])
    expected = fold_offsets(load_model(source), total).state_dict()
    for key, value in load_model(again).state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert calibrate.main([str(missing), str(tmp_path / "out.pt"), "--seeds", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("wrong", [["--frames", "0"], ["--seeds", "-1"], ["--width", "8"], ["--height", "5000"]])
def test_wrong_arguments_are_refused_before_any_work(tmp_path, capsys, wrong):
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main([str(tmp_path / "any.pt"), str(tmp_path / "out.pt"), "--seeds", "3", *wrong])
    assert exit_info.value.code == 2
    assert "--frames and --max-frames must be at least 1" in capsys.readouterr().err


def _generated_cityscapes_tree(root, frames: int) -> None:
    from tdnet_ros.cli.generate import main as generate_main

    assert generate_main(["--seed", "3", "--frames", str(frames), "--out", str(root), "--format", "cityscapes",
                          "--width", "64", "--height", "32", "--split", "val", "--city", "town", "--quiet"]) == 0


def test_calibration_on_a_cityscapes_tree_scores_the_last_frame_of_each_clip(tmp_path, capsys):
    torch.manual_seed(0)
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    root = tmp_path / "cityscapes"
    _generated_cityscapes_tree(root, frames=6)  # every frame labelled: frames 3, 4, 5 have 3 predecessors
    target = tmp_path / "calibrated.pt"

    assert calibrate.main([str(source), str(target), "--cityscapes", str(root), "--threads", "1"]) == 0
    assert f"cityscapes {root}, split val" in capsys.readouterr().out
    stored = read_checkpoint(target)["calibration"]
    assert (stored["dataset"], stored["split"], stored["frames"], stored["pixel_step"]) == ("cityscapes", "val", 3, 1)

    # The same score, counted independently: each clip through a fresh Segmenter, its last
    # frame's labels (at frame size) against the label file.
    segmenter = Segmenter.from_checkpoint(source)
    predicted, truth = [], []
    for last in (3, 4, 5):
        segmenter.reset()
        for frame in range(last - 3, last + 1):
            stem = root / "leftImg8bit_sequence/val/town" / f"town_000003_{frame:06d}_leftImg8bit.png"
            result = segmenter.segment(cv2.cvtColor(cv2.imread(str(stem)), cv2.COLOR_BGR2RGB))
        predicted.append(result.labels)
        label_file = root / "gtFine/val/town" / f"town_000003_{last:06d}_gtFine_labelTrainIds.png"
        truth.append(cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED))
    assert stored["val_miou_before"] == pytest.approx(_iou_by_hand(np.stack(predicted), np.stack(truth), 19), abs=1e-3)


def test_large_frames_are_scored_on_a_regular_grid(tmp_path):
    assert [pixel_step(256, 512), pixel_step(257, 512), pixel_step(1024, 2048)] == [1, 2, 4]
    torch.manual_seed(0)
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    root = tmp_path / "cityscapes"
    _generated_cityscapes_tree(root, frames=5)
    clips = CityscapesClips(root, "val", clip_length=4, gaps=(1, 1))
    segmenter = Segmenter.from_checkpoint(source)
    full, labels, _, step = collect_logits(segmenter, dataset_clips(clips, 10))
    grid, grid_labels, _, grid_step = collect_logits(segmenter, dataset_clips(clips, 10), max_pixels=64 * 32 // 4)
    assert (step, grid_step, full.shape[-2:], grid.shape[-2:]) == (1, 2, (32, 64), (16, 32))
    torch.testing.assert_close(grid, full[:, :, 1::2, 1::2])
    assert np.array_equal(grid_labels, labels[:, 1::2, 1::2])


def test_a_dataset_with_other_classes_or_no_tree_is_one_line(tmp_path, capsys):
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    camvid = make_camvid(tmp_path / "camvid")  # 11 classes; td4-tiny predicts 19
    assert calibrate.main([str(source), str(tmp_path / "out.pt"), "--camvid", str(camvid), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(camvid) in err[0] and "11 classes" in err[0] and "19" in err[0]

    missing = tmp_path / "nowhere"
    assert calibrate.main([str(source), str(tmp_path / "out.pt"), "--cityscapes", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing Cityscapes folder" in err[0] and str(missing) in err[0]
    assert not (tmp_path / "out.pt").exists()


def _record_sequences(bag, seeds: tuple[int, ...], frames: int, gap_s: float = 10.0) -> None:
    """Writes the generated sequences of `seeds` (64x32) one after the other into one recording,
    each starting `gap_s` after the last one ended."""
    from tdnet_ros.data import generate_sequence, write_rosbag

    recorded, start = [], 0
    for seed in seeds:
        sequence = list(generate_sequence(seed, frames, 64, 32))
        offset = start - sequence[0].stamp_ns
        recorded += [(rgb, labels, stamp + offset) for rgb, labels, stamp in sequence]
        start = recorded[-1][2] + int(gap_s * 1e9)
    assert write_rosbag(recorded, bag, storage="mcap") == len(recorded)


def _calibrations_of(source, bag, seeds: list[str], frames: int, tmp_path) -> tuple[dict, dict]:
    """The calibration records of `source` on the recording `bag` and on the generated
    sequences of `seeds` (`frames` each, 64x32)."""
    from_bag, from_seeds = tmp_path / "bag.pt", tmp_path / "seeds.pt"
    assert calibrate.main([str(source), str(from_bag), "--bag", str(bag), "--threads", "1"]) == 0
    assert calibrate.main([str(source), str(from_seeds), "--seeds", *seeds, "--frames", str(frames), "--width", "64",
                           "--height", "32", "--threads", "1"]) == 0
    return read_checkpoint(from_bag)["calibration"], read_checkpoint(from_seeds)["calibration"]


def test_calibration_on_a_recording_matches_the_generated_sequences_it_holds(tmp_path, capsys):
    # Two sequences in one recording, 10 s apart: the cache must be reset at the gap, as
    # generated_sequences resets it between seeds, for the logits (and so the offsets) to agree.
    torch.manual_seed(0)
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    bag = tmp_path / "drive"
    _record_sequences(bag, (3, 5), frames=5)
    recorded, generated = _calibrations_of(source, bag, ["3", "5"], 5, tmp_path)
    assert f"over 10 frames ({bag}, /camera/image_raw labelled by /camera/labels)" in capsys.readouterr().out
    assert (recorded["recording"], recorded["label_topic"], recorded["labelled_frames"]) == (
        str(bag), "/camera/labels", 10)
    assert recorded["val_miou_before"] == pytest.approx(generated["val_miou_before"], abs=1e-6)
    assert recorded["offsets"] == generated["offsets"] and any(recorded["offsets"])


def test_calibration_on_a_recording_spreads_max_frames_over_its_labels(tmp_path, capsys):
    torch.manual_seed(0)
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    bag = tmp_path / "drive"
    _record_sequences(bag, (3,), frames=8)
    assert calibrate.main([str(source), str(tmp_path / "out.pt"), "--bag", str(bag), "--max-frames", "3",
                           "--threads", "1"]) == 0
    assert "over 3 frames" in capsys.readouterr().out  # labels 0, 3 and 6 of 8


def test_a_recording_whose_labels_do_not_fit_or_are_missing_is_one_line(tmp_path, capsys):
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    from tdnet_ros.data import generate_sequence
    from test_evaluation import BagWriter

    bag = tmp_path / "drive"
    writer = BagWriter(bag)  # tdnet_ros' own writer refuses labels of another size
    for rgb, labels, stamp in generate_sequence(3, 2, 64, 32):
        writer.image("/camera/image_raw", stamp, rgb, "rgb8")
        writer.image("/camera/labels", stamp, np.ascontiguousarray(labels[::2, ::2]), "mono8")
    writer.close()
    assert calibrate.main([str(source), str(tmp_path / "out.pt"), "--bag", str(bag)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tdnet calibrate: {bag}: the label map of /camera/image_raw #0 is 32x16, the frame 64x32"]
    assert calibrate.main([str(source), str(tmp_path / "out.pt"), "--bag", str(bag), "--label-topic", "/gt"]) == 2
    assert capsys.readouterr().err.startswith(f"tdnet calibrate: label topic '/gt' is not in recording {bag}")
    assert not (tmp_path / "out.pt").exists()


def test_calibration_on_a_recording_skips_the_frames_tdnet_eval_skips(tmp_path):
    # seed 3's frames with a black copy of frame 1 (same stamp) and an unreadable frame after
    # it: both skipped, the calibration is that of seed 3's frames alone
    from tdnet_ros.data import generate_sequence
    from test_evaluation import BagWriter

    torch.manual_seed(0)
    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    bag = tmp_path / "drive"
    writer = BagWriter(bag)
    for index, (rgb, labels, stamp) in enumerate(generate_sequence(3, 5, 64, 32)):
        writer.image("/camera/image_raw", stamp, rgb, "rgb8")
        writer.image("/camera/labels", stamp, labels, "mono8")
        if index == 1:
            writer.image("/camera/image_raw", stamp, np.zeros_like(rgb), "rgb8")
            writer.image("/camera/image_raw", stamp + 1000, rgb, "weird42")
    writer.close()
    recorded, generated = _calibrations_of(source, bag, ["3"], 5, tmp_path)
    assert recorded["val_miou_before"] == pytest.approx(generated["val_miou_before"], abs=1e-6)
    assert recorded["offsets"] == generated["offsets"]
