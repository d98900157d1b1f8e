"""Overlay video of the predictions (MP4, OpenCV's ``mp4v`` codec)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tdnet_ros.masks import color_lut, colorize, overlay


class OverlayVideoWriter:
    """Writes each evaluated frame blended with its predicted class colours.

    The video size is the first frame's; later frames of another size are resized to it.

    Args:
        path: output ``.mp4`` file.
        class_colors: (K, 3) uint8 RGB colours.
        fps: frame rate of the video.
        alpha: weight of the class colours in the blend.
    """

    def __init__(self, path: str | Path, class_colors: np.ndarray, fps: float = 10.0,
                 alpha: float = 0.5) -> None:
        self.path = Path(path)
        self.fps = float(min(max(fps, 1.0), 120.0))
        self.alpha = alpha
        self._colors = np.asarray(class_colors, dtype=np.uint8)
        self._lut = color_lut(self._colors) if len(self._colors) <= 256 else None
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None  # (width, height)
        self.frames_written = 0

    def add(self, frame_rgb: np.ndarray, labels: np.ndarray, caption: str = "") -> None:
        """Appends one frame: (H, W, 3) uint8 RGB and its (H, W) labels."""
        blended = overlay(frame_rgb, colorize(labels, self._colors, self._lut), self.alpha)
        bgr = cv2.cvtColor(blended, cv2.COLOR_RGB2BGR)
        if self._writer is None:
            self._size = (bgr.shape[1], bgr.shape[0])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = cv2.VideoWriter(
                str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size
            )
            if not self._writer.isOpened():
                raise RuntimeError(f"OpenCV cannot write an mp4v video to {self.path}")
        assert self._size is not None
        if (bgr.shape[1], bgr.shape[0]) != self._size:
            bgr = cv2.resize(bgr, self._size, interpolation=cv2.INTER_NEAREST)
        if caption:
            scale = max(0.4, self._size[1] / 720.0)
            position = (8, int(24 * scale))
            cv2.putText(bgr, caption, position, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                        (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(bgr, caption, position, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                        (255, 255, 255), 1, cv2.LINE_AA)
        self._writer.write(bgr)
        self.frames_written += 1

    def close(self) -> Path | None:
        """Finishes the file; returns its path, or None if no frame was written."""
        if self._writer is None:
            return None
        self._writer.release()
        self._writer = None
        return self.path
