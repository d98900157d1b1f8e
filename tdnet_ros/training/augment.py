"""Clip augmentations: one random draw (scale, crop, flip, colour jitter) for all frames."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import cv2
import numpy as np
import torch

from tdnet_ros.classes import IGNORE_ID
from tdnet_ros.preprocess import IMAGENET_MEAN, IMAGENET_STD

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
_STD = np.array(IMAGENET_STD, dtype=np.float32) * 255


@dataclass(frozen=True)
class AugmentConfig:
    base_size: tuple[int, int] = (256, 512)  # frames are first resized to this (height, width)
    crop: tuple[int, int] = (256, 512)  # training crop (height, width)
    scale: tuple[float, float] = (0.75, 1.5)  # random scale range applied after the base resize
    flip: bool = True
    color_jitter: float = 0.2  # brightness/contrast/saturation factors drawn in [1-j, 1+j]
    # Class-focused crops: with probability `focus_probability` the crop is placed over a
    # random pixel of one of `focus_classes` (train ids) present in the clip's last labelled
    # frame, at a random position inside the crop. Rare, small classes are then seen more
    # often without reweighting the loss of the others.
    focus_classes: tuple[int, ...] = ()
    focus_probability: float = 0.0
    # Probability that a clip's frames are point-sampled at half resolution before the resize,
    # as a frame rendered (or filmed) at half the size and enlarged to the model input is.
    low_resolution: float = 0.0
    # Probability that a whole batch trains on whole frames (the crop is `base_size`, the scale
    # drawn from `whole_frame_scale`) instead of `crop`: pyramid pooling, attention and the
    # spatial LayerNorm then also see the extent they see at inference. Decided per batch,
    # because the clips of one batch must share a shape.
    whole_frame: float = 0.0
    whole_frame_scale: tuple[float, float] = (1.0, 1.5)
    # Give the spatial LayerNorm the part of its per-position parameters that lies under the
    # crop (its window in the frame), instead of the whole frame's parameters squeezed onto
    # the crop: each position then trains the parameters inference applies there.
    align_layer_norm: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.focus_probability <= 1.0:
            raise ValueError(f"augment.focus_probability must be in [0, 1], got {self.focus_probability}")
        if not 0.0 <= self.low_resolution <= 1.0:
            raise ValueError(f"augment.low_resolution must be in [0, 1], got {self.low_resolution}")
        if not 0.0 <= self.whole_frame <= 1.0:
            raise ValueError(f"augment.whole_frame must be in [0, 1], got {self.whole_frame}")
        if self.whole_frame and min(self.whole_frame_scale) < 1.0:
            raise ValueError(
                f"augment.whole_frame_scale must not go below 1.0 (a whole-frame crop would be padded), "
                f"got {list(self.whole_frame_scale)}"
            )
        if self.focus_probability and not self.focus_classes:
            raise ValueError("augment.focus_probability is set but augment.focus_classes is empty")


def to_tensor(frame: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> normalized float (3, H, W), as at inference (ImageNet mean/std)."""
    x = (frame.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _resize(frame: np.ndarray, size: tuple[int, int], labels: bool) -> np.ndarray:
    if frame.shape[:2] == tuple(size):
        return frame
    method = cv2.INTER_NEAREST if labels else cv2.INTER_LINEAR
    return cv2.resize(frame, (size[1], size[0]), interpolation=method)


def _jitter(frame: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Brightness (x -> b x), then saturation (towards the pixel's channel mean g), then
    contrast (towards the frame's mean): all three are linear, so they compose into one
    3x4 colour matrix applied in a single pass, rounded and saturated to uint8:

        c b s x + c b (1 - s) g + (1 - c) b mean(x)

    (the saturation step keeps the frame's mean, so the contrast pivot is b mean(x)).
    """
    pivot = (1.0 - contrast) * brightness * float(np.mean(cv2.mean(frame)[:3]))
    matrix = np.full((3, 4), contrast * brightness * (1.0 - saturation) / 3.0)
    matrix[:, :3] += np.eye(3) * contrast * brightness * saturation
    matrix[:, 3] = pivot
    return cv2.transform(frame, matrix)


def _crop_or_pad(image: np.ndarray, top: int, left: int, crop: tuple[int, int], fill: int) -> np.ndarray:
    h, w = crop
    pad_h, pad_w = max(h - image.shape[0], 0), max(w - image.shape[1], 0)
    if pad_h or pad_w:
        pad = ((0, pad_h), (0, pad_w)) + (((0, 0),) if image.ndim == 3 else ())
        image = np.pad(image, pad, constant_values=fill)
    return image[top : top + h, left : left + w]


def _crop_origin(
    size: tuple[int, int], crop: tuple[int, int], focus_labels: np.ndarray | None,
    config: AugmentConfig, rng: np.random.Generator,
) -> tuple[int, int]:
    """Top-left corner of the crop in a frame of `size`: uniform, or over a focus-class pixel."""
    max_top, max_left = max(size[0] - crop[0], 0), max(size[1] - crop[1], 0)
    if focus_labels is not None and rng.random() < config.focus_probability:
        present = [c for c in config.focus_classes if np.any(focus_labels == c)]
        if present:
            rows, cols = np.nonzero(focus_labels == present[int(rng.integers(len(present)))])
            pick = int(rng.integers(len(rows)))
            # The crop's corner is drawn so that the chosen pixel lands anywhere inside it.
            top = int(rows[pick]) - int(rng.integers(0, crop[0]))
            left = int(cols[pick]) - int(rng.integers(0, crop[1]))
            return min(max(top, 0), max_top), min(max(left, 0), max_left)
    return int(rng.integers(0, max_top + 1)), int(rng.integers(0, max_left + 1))


class AugmentedClip(NamedTuple):
    frames: list[np.ndarray]  # uint8 (crop_h, crop_w, 3) each
    labels: list[np.ndarray]  # uint8 (crop_h, crop_w); 255 where a frame had none and in the padding
    window: np.ndarray  # float32 (4,): the crop in the frame, see `crop_window`


def crop_window(size: tuple[int, int], top: int, left: int, crop: tuple[int, int], flip: bool) -> np.ndarray:
    """Where a crop lies in its frame: (top, left, bottom, right) in grid_sample's coordinates.

    -1 and 1 are the centres of the frame's first and last pixels (align_corners=True, as the
    LayerNorm's resize uses); bottom/right are the crop's last row/column, beyond 1 where the
    crop was padded. A flipped crop has left > right, since its first column is the frame's
    right edge. The whole frame, unflipped, is (-1, -1, 1, 1).
    """
    def to_grid(first: int, count: int, extent: int) -> tuple[float, float]:
        scale = 2.0 / max(extent - 1, 1)
        return first * scale - 1.0, (first + count - 1) * scale - 1.0

    y0, y1 = to_grid(top, crop[0], size[0])
    x0, x1 = to_grid(left, crop[1], size[1])
    if flip:
        x0, x1 = x1, x0
    return np.array([y0, x0, y1, x1], dtype=np.float32)


def augment_clip(
    frames: list[np.ndarray], labels: list[np.ndarray | None], config: AugmentConfig, rng: np.random.Generator,
    whole_frame: bool = False,
) -> AugmentedClip:
    """Applies the same random scale, crop, flip and colour jitter to every frame of a clip.

    Returns the frames and labels at crop size and the crop's window in the frame. With
    `whole_frame` the crop is `base_size` and the scale `whole_frame_scale`.
    """
    if whole_frame:
        config = replace(config, crop=config.base_size, scale=config.whole_frame_scale)
    s = rng.uniform(*config.scale)
    size = (round(config.base_size[0] * s), round(config.base_size[1] * s))
    labels = [None if label is None else _resize(label, size, True) for label in labels]
    labelled = [label for label in labels if label is not None]
    focus_labels = labelled[-1] if config.focus_probability and labelled else None
    top, left = _crop_origin(size, config.crop, focus_labels, config, rng)
    flip = config.flip and rng.random() < 0.5
    half = config.low_resolution > 0 and rng.random() < config.low_resolution
    j = config.color_jitter
    factors = rng.uniform(1 - j, 1 + j, size=3) if j else None
    out_frames, out_labels = [], []
    for frame, label in zip(frames, labels):
        if half:
            frame = frame[::2, ::2]  # (H/2, W/2, 3); the resize below enlarges it back
        frame = _crop_or_pad(_resize(frame, size, False), top, left, config.crop, 0)
        if label is None:
            label = np.full(config.crop, IGNORE_ID, dtype=np.uint8)
        else:
            label = _crop_or_pad(label, top, left, config.crop, IGNORE_ID)
        if flip:
            frame, label = frame[:, ::-1], label[:, ::-1]
        if factors is not None:
            frame = _jitter(frame, *factors)
        out_frames.append(np.ascontiguousarray(frame))
        out_labels.append(np.ascontiguousarray(label))
    return AugmentedClip(out_frames, out_labels, crop_window(size, top, left, config.crop, flip))


def prepare_eval_clip(
    frames: list[np.ndarray], labels: list[np.ndarray | None], size: tuple[int, int]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Validation: frames resized to the model input size; the last frame's labels unchanged."""
    last = labels[-1]
    if last is None:
        raise ValueError("the last frame of a validation clip has no labels")
    return [_resize(f, size, False) for f in frames], last
