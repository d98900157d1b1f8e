"""Rendering of label maps: class colours, overlays and per-class cropped masks (numpy/cv2).

`Renderer` is what the node's colour, overlay and mask outputs use; no ROS imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ClassRegion:
    """The pixels of one class in a label map."""

    class_id: int
    pixel_count: int
    x: int  # left column of the bounding box
    y: int  # top row
    width: int
    height: int
    mask: np.ndarray  # (height, width) uint8, 255 inside the class, 0 elsewhere


def color_lut(class_colors: np.ndarray) -> np.ndarray:
    """A (256, 1, 3) lookup table for :func:`colorize` (unknown ids map to black).

    Args:
        class_colors: (K, 3) uint8 RGB colours, K <= 256.
    """
    colors = np.asarray(class_colors, dtype=np.uint8)
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] > 256:
        raise ValueError(f"class colours must be (K<=256, 3), got {colors.shape}")
    lut = np.zeros((256, 1, 3), dtype=np.uint8)
    lut[: colors.shape[0], 0] = colors
    return lut


def colorize(labels: np.ndarray, class_colors: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """Paints each pixel of ``labels`` with its class colour.

    Args:
        labels: (H, W) integer class ids.
        class_colors: (K, 3) uint8 RGB colours.
        lut: optional precomputed :func:`color_lut` (saves its construction per frame).

    Returns:
        (H, W, 3) uint8 RGB image; ids without a colour are black.
    """
    if labels.dtype == np.uint8 and (lut is not None or len(class_colors) <= 256):
        lut = color_lut(class_colors) if lut is None else lut
        # cv2.LUT applies a 3-channel table to a 3-channel image: several times faster
        # than numpy fancy indexing at camera resolution.
        return cv2.LUT(cv2.merge([labels, labels, labels]), lut)
    colors = np.zeros((int(labels.max()) + 1 if labels.size else 1, 3), dtype=np.uint8)
    known = min(len(class_colors), colors.shape[0])
    colors[:known] = np.asarray(class_colors, dtype=np.uint8)[:known]
    return colors[labels]


def overlay(image_rgb: np.ndarray, color_rgb: np.ndarray, alpha: float) -> np.ndarray:
    """Blends ``color_rgb`` over ``image_rgb``: ``(1 - alpha) * image + alpha * color``."""
    if image_rgb.shape != color_rgb.shape:
        raise ValueError(f"image {image_rgb.shape} and colours {color_rgb.shape} differ in shape")
    return cv2.addWeighted(image_rgb, 1.0 - alpha, color_rgb, alpha, 0.0)


def class_regions(labels: np.ndarray, num_classes: int | None = None) -> list[ClassRegion]:
    """Per-class pixel counts, bounding boxes and cropped masks of a label map.

    Args:
        labels: (H, W) integer class ids.
        num_classes: ignore ids at or above this (e.g. 255 "void"); None keeps all.

    Returns:
        One :class:`ClassRegion` per class present, in increasing class id.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got {labels.shape}")
    if labels.dtype == np.uint8:
        # OpenCV's histogram, comparison and bounding box are several times faster than
        # numpy's at camera resolution (this runs for every frame with a mask subscriber).
        counts = cv2.calcHist([labels], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        counts = np.bincount(labels.ravel(), minlength=1)
    present = np.flatnonzero(counts)
    if num_classes is not None:
        present = present[present < num_classes]
    regions = []
    for class_id in present:
        if labels.dtype == np.uint8:
            inside = cv2.compare(labels, int(class_id), cv2.CMP_EQ)  # (H, W) 0/255
        else:
            inside = np.where(labels == class_id, np.uint8(255), np.uint8(0))
        x, y, width, height = cv2.boundingRect(inside)
        regions.append(
            ClassRegion(
                class_id=int(class_id),
                pixel_count=int(counts[class_id]),
                x=x,
                y=y,
                width=width,
                height=height,
                mask=np.ascontiguousarray(inside[y:y + height, x:x + width]),
            )
        )
    return regions


class Renderer:
    """Renders one class table's outputs of label maps: colour image, overlay and masks.

    Args:
        class_colors: (K, 3) uint8 RGB colours.
        overlay_alpha: weight of the colours in the overlay (may change at run time).
    """

    def __init__(self, class_colors: np.ndarray, overlay_alpha: float = 0.5) -> None:
        self.class_colors = np.asarray(class_colors, dtype=np.uint8)
        self.num_classes = len(self.class_colors)
        self.overlay_alpha = overlay_alpha
        self._lut = color_lut(self.class_colors) if self.num_classes <= 256 else None

    def color(self, labels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB class colours of (H, W) labels."""
        return colorize(labels, self.class_colors, self._lut)

    def overlay(self, rgb: np.ndarray, color: np.ndarray) -> np.ndarray:
        """The camera image with the class colours blended over it (at overlay_alpha)."""
        return overlay(rgb, color, self.overlay_alpha)

    def masks(self, labels: np.ndarray) -> list[ClassRegion]:
        """One cropped mask per class present."""
        return class_regions(labels, num_classes=self.num_classes)
