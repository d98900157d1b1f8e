"""Clip datasets: the generated street videos, Cityscapes and CamVid video layouts.

A sample is a clip of `clip_length` frames ending on a labelled frame, the frames `gap`
apart (each gap drawn from `gaps`). `load_clip` returns the frames (uint8 RGB, oldest first)
and a label map per frame (train ids, 255 = ignore; None where a frame has no label).
"""

from __future__ import annotations

import multiprocessing
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import cv2
import numpy as np

from tdnet_ros.classes import IGNORE_ID, label_id_to_train_id_table
from tdnet_ros.runtime import usable_cpu_cores

Clip = tuple[list[np.ndarray], list[np.ndarray | None]]


class DatasetError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent (names the file)."""


def read_image(path: Path) -> np.ndarray:
    """Reads an image file as uint8 RGB."""
    if not path.is_file():
        raise DatasetError(f"missing image file: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image file: {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path, lut: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Reads a single-channel label PNG, maps it through `lut`, checks its class ids."""
    if not path.is_file():
        raise DatasetError(f"missing label file: {path}")
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise DatasetError(f"cannot read label file: {path}")
    if labels.ndim != 2:
        raise DatasetError(f"label file {path} must be single-channel class ids, got shape {labels.shape}")
    if lut is not None:
        labels = lut[labels]
    labels = labels.astype(np.uint8)
    bad = np.unique(labels[(labels >= num_classes) & (labels != IGNORE_ID)])
    if bad.size:
        raise DatasetError(
            f"label file {path} holds unknown class ids {bad[:10].tolist()} (classes are 0..{num_classes - 1}, 255 = ignore)"
        )
    return labels


def check_sizes(frames: Sequence[np.ndarray], labels: Sequence[np.ndarray | None], names: Sequence[str]) -> None:
    """All frames and labels of a clip must have the same height and width."""
    size = frames[-1].shape[:2]
    for frame, label, name in zip(frames, labels, names):
        if frame.shape[:2] != size:
            raise DatasetError(f"image {name} is {frame.shape[1]}x{frame.shape[0]}, the clip's frames are {size[1]}x{size[0]}")
        if label is not None and label.shape != size:
            raise DatasetError(
                f"label of {name} is {label.shape[1]}x{label.shape[0]} but the image is {size[1]}x{size[0]}"
            )


def draw_gaps(rng: np.random.Generator, clip_length: int, gaps: tuple[int, int]) -> list[int]:
    """Gaps between consecutive clip frames, each uniform in [gaps[0], gaps[1]]."""
    return [int(g) for g in rng.integers(gaps[0], gaps[1] + 1, size=clip_length - 1)]


def clip_offsets(gap_list: Sequence[int]) -> list[int]:
    """Frame offsets relative to the labelled (last) frame, oldest first: e.g. [-3, -2, -1, 0]."""
    offsets = [0]
    for gap in reversed(gap_list):
        offsets.insert(0, offsets[0] - gap)
    return offsets


class ClipDataset:
    """Base class: `samples` are labelled frames; `load_clip(index, rng)` builds a clip."""

    num_classes: int
    clip_length: int
    gaps: tuple[int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def load_clip(self, index: int, rng: np.random.Generator | None) -> Clip:
        """Clip ending on sample `index`; gaps drawn from `rng`, or the smallest gap if None."""
        raise NotImplementedError

    def class_pixel_counts(self, max_samples: int = 256) -> np.ndarray:
        """(num_classes,) pixel counts of the labelled frames of up to `max_samples` samples,
        evenly spread over the dataset (ignored pixels are not counted)."""
        counts = np.zeros(self.num_classes, np.int64)
        for index in np.linspace(0, len(self) - 1, min(max_samples, len(self))).astype(int):
            labels = np.asarray(self.load_clip(int(index), None)[1][-1])
            counts += np.bincount(labels[labels < self.num_classes].ravel(), minlength=self.num_classes)
        return counts

    def _gap_list(self, rng: np.random.Generator | None) -> list[int]:
        if rng is None:
            return [self.gaps[0]] * (self.clip_length - 1)
        return draw_gaps(rng, self.clip_length, self.gaps)


# -- generated street videos ---------------------------------------------------------------


def render_sequence(seed: int, frames: int, size: tuple[int, int],
                    rare_object_rate: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One generated street video: images (T, H, W, 3) and labels (T, H, W), uint8."""
    from tdnet_ros.data import StreetConfig, generate_sequence  # pybullet is only needed here

    height, width = size
    config = StreetConfig(rare_object_rate=rare_object_rate)
    rendered = list(generate_sequence(seed, frames, width=width, height=height, config=config))
    return np.stack([f.rgb for f in rendered]), np.stack([f.labels for f in rendered])


def _render_into(path: Path, seed: int, frames: int, size: tuple[int, int], rare_object_rate: float) -> None:
    """Renders one sequence into the cache file `path` (whole or not at all)."""
    images, labels = render_sequence(seed, frames, size, rare_object_rate)
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, images=images, labels=labels)
    partial.replace(path)


class GeneratedClips(ClipDataset):
    """Street videos rendered by `tdnet_ros.data.generate_sequence` (every frame labelled).

    Sequences are rendered once and kept in memory; with `cache_dir` they are also stored as
    `.npz` files and reused by later runs. Missing cache files are rendered by
    `render_workers` processes at once (0: one per CPU core), since rendering is
    single-threaded. `rare_object_rate` above 1 renders scenes with more of the rarest
    classes' objects (`StreetConfig.rare_object_rate`).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        frames: int,
        size: tuple[int, int],
        clip_length: int,
        gaps: tuple[int, int],
        cache_dir: str | Path | None = None,
        num_classes: int = 19,
        render_workers: int = 0,
        rare_object_rate: float = 1.0,
    ) -> None:
        self.num_classes, self.clip_length, self.gaps = num_classes, clip_length, gaps
        self.images: list[np.ndarray] = []  # per seed: (T, H, W, 3) uint8
        self.labels: list[np.ndarray] = []  # per seed: (T, H, W) uint8
        height, width = size
        scenes = "" if rare_object_rate == 1.0 else f"_rare{rare_object_rate:g}"
        cached = {
            seed: Path(cache_dir) / f"street_s{seed}_n{frames}_{width}x{height}{scenes}.npz" if cache_dir else None
            for seed in seeds
        }
        missing = [seed for seed, path in cached.items() if path is not None and not path.is_file()]
        if missing:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            workers = min(len(missing), render_workers or usable_cpu_cores())
            if workers > 1:
                # spawn: a forked pybullet or torch state is not safe to reuse
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                    list(pool.map(_render_into, [cached[s] for s in missing], missing, repeat(frames), repeat(size),
                                  repeat(rare_object_rate)))
            else:
                for seed in missing:
                    _render_into(cached[seed], seed, frames, size, rare_object_rate)
        for seed in seeds:
            path = cached[seed]
            if path is None:
                images, labels = render_sequence(seed, frames, size, rare_object_rate)
            else:
                data = np.load(path)
                images, labels = data["images"], data["labels"]
            self.images.append(images)
            self.labels.append(labels)
        first = (clip_length - 1) * gaps[1]  # earliest frame whose every clip fits in the video
        self.samples = [(s, t) for s in range(len(seeds)) for t in range(min(first, frames - 1), frames)]

    def __len__(self) -> int:
        return len(self.samples)

    def load_clip(self, index: int, rng: np.random.Generator | None) -> Clip:
        seq, t = self.samples[index]
        frames = [max(t + o, 0) for o in clip_offsets(self._gap_list(rng))]
        return [self.images[seq][f] for f in frames], [self.labels[seq][f] for f in frames]


# -- Cityscapes ----------------------------------------------------------------------------

_CITYSCAPES_GT = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_gtFine_(?P<kind>labelTrainIds|labelIds)\.png$")


class CityscapesClips(ClipDataset):
    """Cityscapes `leftImg8bit_sequence/<split>/<city>/` + `gtFine/<split>/<city>/`.

    Every ground-truth file (`*_gtFine_labelTrainIds.png`, else `*_gtFine_labelIds.png`,
    mapped to train ids) is a labelled frame; the clip's earlier frames are read from the
    sequence folder (in Cityscapes the annotated frame is the 20th of a 30-frame snippet, so
    its 19 predecessors are there). Folders written by `tdnet-generate --format cityscapes`
    (every frame labelled) work the same way; labelled frames without enough predecessors
    are skipped.
    """

    def __init__(self, root: str | Path, split: str, clip_length: int, gaps: tuple[int, int], num_classes: int = 19):
        self.root, self.split = Path(root), split
        self.num_classes, self.clip_length, self.gaps = num_classes, clip_length, gaps
        gt_dir = self.root / "gtFine" / split
        self.image_dir = self.root / "leftImg8bit_sequence" / split
        for folder in (gt_dir, self.image_dir):
            if not folder.is_dir():
                raise DatasetError(f"missing Cityscapes folder: {folder}")
        self.lut = np.array(label_id_to_train_id_table(), dtype=np.uint8)
        found: dict[tuple[str, str, int], tuple[Path, bool]] = {}
        for path in sorted(gt_dir.glob("*/*_gtFine_*.png")):
            match = _CITYSCAPES_GT.match(path.name)
            if not match:
                continue
            key = (match["city"], match["seq"], int(match["frame"]))
            train_ids = match["kind"] == "labelTrainIds"
            if key not in found or train_ids:
                found[key] = (path, train_ids)
        if not found:
            raise DatasetError(f"no *_gtFine_labelTrainIds.png or *_gtFine_labelIds.png files under {gt_dir}")
        # Every labelled frame whose earliest clip frame exists in the sequence folder.
        reach = (clip_length - 1) * gaps[1]
        self.samples = []
        for (city, seq, frame), (path, train_ids) in sorted(found.items()):
            image = self._image_path(city, seq, frame)
            if not image.is_file():
                raise DatasetError(f"missing image for label {path}: {image}")
            if frame - reach >= 0:  # a missing predecessor is reported when the clip is read
                self.samples.append((city, seq, frame, path, train_ids))
        if not self.samples:
            raise DatasetError(f"no labelled frame under {gt_dir} has {reach} frames before it")
        self.labelled = {(c, s, f): (p, t) for (c, s, f), (p, t) in found.items()}

    def _image_path(self, city: str, seq: str, frame: int) -> Path:
        return self.image_dir / city / f"{city}_{seq}_{frame:06d}_leftImg8bit.png"

    def __len__(self) -> int:
        return len(self.samples)

    def load_clip(self, index: int, rng: np.random.Generator | None) -> Clip:
        city, seq, frame, _, _ = self.samples[index]
        frames, labels, names = [], [], []
        for offset in clip_offsets(self._gap_list(rng)):
            path = self._image_path(city, seq, frame + offset)
            frames.append(read_image(path))
            names.append(str(path))
            label = self.labelled.get((city, seq, frame + offset))
            labels.append(None if label is None else read_label(label[0], None if label[1] else self.lut, self.num_classes))
        check_sizes(frames, labels, names)
        return frames, labels


# -- CamVid --------------------------------------------------------------------------------

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist",
)
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
_CAMVID_NAME = re.compile(r"^(?P<seq>[0-9A-Za-z]+)_(?P<frame>\d+)\.png$")


class CamVidClips(ClipDataset):
    """CamVid in the SegNet layout plus the videos' frames.

    `<root>/<split>/<seq>_<frame>.png` are the labelled images, `<root>/<split>annot/` the
    label PNGs with the 11 class ids (11 = void, mapped to 255), and
    `<root>/sequences/<seq>/<seq>_<frame>.png` every video frame (extracted from the `.MXF`
    videos with the same frame numbering), from which the clip's earlier frames are read.
    """

    def __init__(self, root: str | Path, split: str, clip_length: int, gaps: tuple[int, int], num_classes: int = 11):
        self.root, self.split = Path(root), split
        self.num_classes, self.clip_length, self.gaps = num_classes, clip_length, gaps
        image_dir, label_dir = self.root / split, self.root / f"{split}annot"
        for folder in (image_dir, label_dir, self.root / "sequences"):
            if not folder.is_dir():
                raise DatasetError(f"missing CamVid folder: {folder}")
        self.lut = np.full(256, IGNORE_ID, dtype=np.uint8)
        self.lut[: len(CAMVID_CLASSES)] = np.arange(len(CAMVID_CLASSES))
        self.samples = []
        for image in sorted(image_dir.glob("*.png")):
            match = _CAMVID_NAME.match(image.name)
            if not match:
                raise DatasetError(f"CamVid image name {image} is not <sequence>_<frame>.png")
            label = label_dir / image.name
            if not label.is_file():
                raise DatasetError(f"missing label file for {image}: {label}")
            self.samples.append((match["seq"], match["frame"], image, label))
        if not self.samples:
            raise DatasetError(f"no CamVid images in {image_dir}")

    def __len__(self) -> int:
        return len(self.samples)

    def load_clip(self, index: int, rng: np.random.Generator | None) -> Clip:
        seq, frame_text, image, label = self.samples[index]
        frame, digits = int(frame_text), len(frame_text)
        frames, names = [], []
        for offset in clip_offsets(self._gap_list(rng)):
            path = image if offset == 0 else self.root / "sequences" / seq / f"{seq}_{frame + offset:0{digits}d}.png"
            frames.append(read_image(path))
            names.append(str(path))
        labels: list[np.ndarray | None] = [None] * (len(frames) - 1) + [read_label(label, self.lut, self.num_classes)]
        check_sizes(frames, labels, names)
        return frames, labels


DatasetFactory = Callable[..., ClipDataset]
