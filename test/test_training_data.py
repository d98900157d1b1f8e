"""Training datasets on tiny trees in the official Cityscapes and CamVid layouts, the clip
augmentation, and the errors bad input gives."""

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from tdnet_ros.training.augment import AugmentConfig, augment_clip
from tdnet_ros.training.datasets import CamVidClips, CityscapesClips, DatasetError, GeneratedClips, clip_offsets

H, W = 24, 48


def _frame(value: int) -> np.ndarray:
    frame = np.zeros((H, W, 3), np.uint8)
    frame[..., 0] = value  # each frame's red channel tells which frame it is
    return frame


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_gray(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), labels)


def make_cityscapes(root: Path, label_ids: np.ndarray | None = None) -> Path:
    """One 30-frame snippet of `aachen`, annotated on its 20th frame (as in Cityscapes)."""
    for frame in range(30):
        _write_rgb(root / "leftImg8bit_sequence/train/aachen" / f"aachen_000000_{frame:06d}_leftImg8bit.png", _frame(frame))
    if label_ids is None:
        label_ids = np.full((H, W), 7, np.uint8)  # road
        label_ids[:, : W // 2] = 26  # car
        label_ids[0] = 0  # unlabeled
    _write_gray(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", label_ids)
    return root


def make_camvid(root: Path) -> Path:
    """SegNet-layout CamVid (train/, trainannot/) plus the video's frames in sequences/."""
    for frame in range(90, 121):
        _write_rgb(root / "sequences/0001TP" / f"0001TP_{frame:06d}.png", _frame(frame - 90))
    _write_rgb(root / "train/0001TP_000120.png", _frame(30))
    labels = np.full((H, W), 3, np.uint8)  # road
    labels[0] = 11  # void
    _write_gray(root / "trainannot/0001TP_000120.png", labels)
    return root


def test_clip_offsets():
    assert clip_offsets([1, 2, 1]) == [-4, -3, -1, 0]


def test_cityscapes_clip(tmp_path):
    data = CityscapesClips(make_cityscapes(tmp_path), "train", clip_length=4, gaps=(1, 2))
    assert len(data) == 1
    frames, labels = data.load_clip(0, None)  # smallest gaps: frames 16..19
    assert [int(f[0, 0, 0]) for f in frames] == [16, 17, 18, 19]
    assert labels[:3] == [None, None, None]
    assert labels[3][1, 0] == 13 and labels[3][1, -1] == 0 and (labels[3][0] == 255).all()
    rng = np.random.default_rng(0)
    for _ in range(5):
        frames, _ = data.load_clip(0, rng)
        red = [int(f[0, 0, 0]) for f in frames]
        assert red[-1] == 19 and all(1 <= b - a <= 2 for a, b in zip(red, red[1:]))


def test_camvid_clip(tmp_path):
    data = CamVidClips(make_camvid(tmp_path), "train", clip_length=4, gaps=(2, 2))
    frames, labels = data.load_clip(0, None)
    assert [int(f[0, 0, 0]) for f in frames] == [24, 26, 28, 30]
    assert labels[-1][1, 0] == 3 and (labels[-1][0] == 255).all()


def test_missing_label_names_the_file(tmp_path):
    root = make_camvid(tmp_path)
    (root / "trainannot/0001TP_000120.png").unlink()
    with pytest.raises(DatasetError, match="0001TP_000120.png"):
        CamVidClips(root, "train", 4, (1, 2))


def test_missing_sequence_frame_names_the_file(tmp_path):
    root = make_cityscapes(tmp_path)
    (root / "leftImg8bit_sequence/train/aachen/aachen_000000_000017_leftImg8bit.png").unlink()
    data = CityscapesClips(root, "train", 4, (1, 1))
    with pytest.raises(DatasetError, match="aachen_000000_000017_leftImg8bit.png"):
        data.load_clip(0, None)


def test_mismatched_sizes_name_the_file(tmp_path):
    root = make_cityscapes(tmp_path, label_ids=np.full((H + 2, W), 7, np.uint8))
    data = CityscapesClips(root, "train", 4, (1, 1))
    with pytest.raises(DatasetError, match="aachen_000000_000019_leftImg8bit.png"):
        data.load_clip(0, None)


def test_unknown_class_id_names_the_file(tmp_path):
    root = make_cityscapes(tmp_path)
    train_ids = np.zeros((H, W), np.uint8)
    train_ids[3, 3] = 42
    _write_gray(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", train_ids)
    data = CityscapesClips(root, "train", 4, (1, 1))  # the train-id file is preferred
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_gtFine_labelTrainIds\.png.*\[42\]"):
        data.load_clip(0, None)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="gtFine"):
        CityscapesClips(tmp_path, "train", 4, (1, 2))


def test_augmentation_is_the_same_for_every_frame():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    labels = rng.integers(0, 19, (64, 128), dtype=np.uint8)
    config = AugmentConfig(base_size=(64, 128), crop=(48, 96), scale=(0.5, 1.5), flip=True, color_jitter=0.3)
    for seed in range(6):
        frames, out_labels, _ = augment_clip([frame] * 4, [labels, None, labels, labels], config, np.random.default_rng(seed))
        assert all(f.shape == (48, 96, 3) for f in frames)
        assert all(np.array_equal(f, frames[0]) for f in frames)
        assert np.array_equal(out_labels[0], out_labels[2]) and np.array_equal(out_labels[0], out_labels[3])
        assert (out_labels[1] == 255).all()  # the frame without labels is ignored


@pytest.mark.parametrize("brightness, contrast, saturation", [(1.2, 0.8, 1.3), (0.8, 1.2, 0.7), (1.0, 1.0, 1.0)])
def test_colour_jitter_is_brightness_then_saturation_then_contrast(brightness, contrast, saturation):
    """The one-pass colour matrix against the three steps done one after the other in float64."""
    from tdnet_ros.training.augment import _jitter

    rng = np.random.default_rng(5)
    padded = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    frame = padded[3:35, 5:69]  # a crop: a view whose rows are not contiguous
    x = frame.astype(np.float64) * brightness
    gray = x.mean(axis=2, keepdims=True)
    x = gray + (x - gray) * saturation
    x = x.mean() + (x - x.mean()) * contrast
    expected = np.clip(np.round(x), 0, 255)
    out = _jitter(frame, brightness, contrast, saturation)
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0  # rounding of the last bit only
    assert (out != frame).any() or brightness == contrast == saturation == 1.0


def test_focused_crops_contain_the_focus_class():
    # One 3x3 pole (train id 5) in a corner of a 128x256 frame: a uniform 32x64 crop holds it
    # about 1 time in 20; a crop focused on it must hold it every time, the pixel at a
    # different place inside the crop from draw to draw.
    labels = np.zeros((128, 256), np.uint8)
    labels[4:7, 240:243] = 5
    frame = np.zeros((128, 256, 3), np.uint8)
    uniform = AugmentConfig(base_size=(128, 256), crop=(32, 64), scale=(1.0, 1.0), flip=False, color_jitter=0.0)
    focused = AugmentConfig(base_size=(128, 256), crop=(32, 64), scale=(1.0, 1.0), flip=False, color_jitter=0.0,
                            focus_classes=(5, 6), focus_probability=1.0)

    def pole_places(config):
        places = []
        for seed in range(40):
            _, out, _ = augment_clip([frame] * 2, [None, labels], config, np.random.default_rng(seed))
            rows, cols = np.nonzero(out[1] == 5)
            places.append((int(rows.min()), int(cols.min())) if rows.size else None)
        return places

    focused_places = pole_places(focused)
    assert all(p is not None for p in focused_places)
    assert len(set(focused_places)) > 5
    assert sum(p is not None for p in pole_places(uniform)) < 10
    # A clip without any focus class falls back to a uniform crop rather than failing.
    _, out, _ = augment_clip([frame], [np.zeros_like(labels)], focused, np.random.default_rng(0))
    assert out[0].shape == (32, 64)


def test_focus_settings_are_checked():
    with pytest.raises(ValueError, match="focus_probability"):
        AugmentConfig(focus_classes=(5,), focus_probability=1.5)
    with pytest.raises(ValueError, match="focus_classes"):
        AugmentConfig(focus_probability=0.5)


def test_low_resolution_clips_keep_their_labels():
    # Every other row and column point-sampled, then enlarged back: the image loses its finest
    # detail (a one-pixel checkerboard becomes flat), the labels stay the full-resolution ones.
    frame = np.zeros((64, 128, 3), np.uint8)
    frame[::2, ::2] = 200
    frame[1::2, 1::2] = 200
    labels = np.random.default_rng(0).integers(0, 19, (64, 128), dtype=np.uint8)
    config = AugmentConfig(base_size=(64, 128), crop=(64, 128), scale=(1.0, 1.0), flip=False, color_jitter=0.0,
                           low_resolution=1.0)
    frames, out, _ = augment_clip([frame] * 2, [labels, labels], config, np.random.default_rng(0))
    assert frames[0].shape == (64, 128, 3) and (frames[0] == 200).all()
    assert np.array_equal(out[1], labels)
    plain, _, _ = augment_clip([frame], [labels], dataclasses.replace(config, low_resolution=0.0), np.random.default_rng(0))
    assert np.array_equal(plain[0], frame)
    with pytest.raises(ValueError, match="low_resolution"):
        AugmentConfig(low_resolution=2.0)


def test_whole_frame_clips_keep_the_whole_frame():
    # A whole-frame clip at scale 1 is the frame itself (no crop, no padding); at a larger
    # scale it is a base_size window of the enlarged frame. A plain clip keeps `crop`.
    frame = np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    labels = np.random.default_rng(2).integers(0, 19, (64, 128), dtype=np.uint8)
    config = AugmentConfig(base_size=(64, 128), crop=(32, 64), scale=(0.5, 1.0), flip=False, color_jitter=0.0,
                           whole_frame=0.5, whole_frame_scale=(1.0, 1.0))
    frames, out, _ = augment_clip([frame] * 2, [labels, labels], config, np.random.default_rng(0), whole_frame=True)
    assert np.array_equal(frames[0], frame) and np.array_equal(out[1], labels)
    plain, _, _ = augment_clip([frame], [labels], config, np.random.default_rng(0))
    assert plain[0].shape == (32, 64, 3)
    enlarged = dataclasses.replace(config, whole_frame_scale=(1.5, 1.5))
    frames, out, _ = augment_clip([frame], [labels], enlarged, np.random.default_rng(0), whole_frame=True)
    assert frames[0].shape == (64, 128, 3) and (out[0] != 255).all()
    with pytest.raises(ValueError, match="whole_frame must"):
        AugmentConfig(whole_frame=1.5)
    with pytest.raises(ValueError, match="whole_frame_scale"):
        AugmentConfig(whole_frame=0.5, whole_frame_scale=(0.8, 1.2))


@pytest.mark.parametrize("flip", [False, True])
def test_crop_window_locates_the_crop_in_the_scaled_frame(flip):
    # Each pixel of the frame carries its own row (channel 0) and column (channel 1); the
    # window, mapped back to pixels of the scaled frame, must name the rows and columns the
    # crop actually holds, also where the crop is flipped.
    height, width = 60, 120
    rows, cols = np.mgrid[0:height, 0:width]
    frame = np.stack([rows * 2, cols * 2, np.zeros_like(rows)], -1).astype(np.uint8)
    labels = np.zeros((height, width), np.uint8)
    config = AugmentConfig(base_size=(height, width), crop=(24, 40), scale=(2.0, 2.0), flip=flip, color_jitter=0.0)
    size = (2 * height, 2 * width)  # the frame at scale 2, where the crop is taken
    windows = []
    for seed in range(8):
        clip = augment_clip([frame], [labels], config, np.random.default_rng(seed))
        top, left, bottom, right = clip.window.tolist()
        ys = (np.linspace(top, bottom, 24) + 1) / 2 * (size[0] - 1)  # scaled-frame rows of the crop's rows
        xs = (np.linspace(left, right, 40) + 1) / 2 * (size[1] - 1)
        # channel 0 holds 2 * the source row, which is (scaled row) / 2 up to the linear resize
        np.testing.assert_allclose(clip.frames[0][:, 0, 0], ys, atol=1.01)
        np.testing.assert_allclose(clip.frames[0][0, :, 1], xs, atol=1.01)
        windows.append((top, left))
    assert len(set(windows)) > 4
    whole = augment_clip([frame], [labels], dataclasses.replace(config, crop=size), np.random.default_rng(0))
    expected = [-1.0, 1.0, 1.0, -1.0] if flip else [-1.0, -1.0, 1.0, 1.0]
    assert whole.window.tolist() == expected


def test_missing_sequences_render_in_parallel_as_they_do_one_by_one(tmp_path):
    # Two processes fill the cache with exactly the sequences one process renders; a second
    # dataset on the same cache renders nothing (its files are not rewritten).
    seeds, frames, size = [3, 4], 3, (32, 64)
    apart = GeneratedClips(seeds, frames, size, 2, (1, 1), tmp_path / "parallel", render_workers=2)
    alone = GeneratedClips(seeds, frames, size, 2, (1, 1), tmp_path / "serial", render_workers=1)
    for a, b in zip(apart.images + apart.labels, alone.images + alone.labels):
        assert np.array_equal(a, b)
    files = sorted((tmp_path / "parallel").iterdir())
    assert [f.name for f in files] == ["street_s3_n3_64x32.npz", "street_s4_n3_64x32.npz"]
    written = [f.stat().st_mtime_ns for f in files]
    again = GeneratedClips(seeds, frames, size, 2, (1, 1), tmp_path / "parallel")
    assert [f.stat().st_mtime_ns for f in files] == written and len(again) == len(apart)


def test_scenes_with_more_rare_objects_are_cached_apart(tmp_path):
    # the usual scenes and those of data.rare_object_rate never share a cache file
    seeds, frames, size = [3], 2, (32, 64)
    usual = GeneratedClips(seeds, frames, size, 2, (1, 1), tmp_path, render_workers=1)
    more = GeneratedClips(seeds, frames, size, 2, (1, 1), tmp_path, render_workers=1, rare_object_rate=2.5)
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["street_s3_n2_64x32.npz", "street_s3_n2_64x32_rare2.5.npz"]
    assert not np.array_equal(usual.labels[0], more.labels[0])
    from tdnet_ros.training.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"data.rare_object_rate must be within 1..4 \(1: the usual scenes\), got 5"):
        from_dict({"data": {"rare_object_rate": 5}})
