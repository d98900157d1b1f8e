"""The evaluation video: camera | ground truth | prediction, side by side, as browser-playable
H.264 MP4 (PyAV's bundled FFmpeg and libx264; yuv420p, the index at the front).

Each frame has a caption line (frame index, latency, running mIoU) on top and a legend of
the classes present in its ground truth or prediction below.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tdnet_ros.masks import color_lut, colorize, overlay

IGNORE_LABEL = 255
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class EvaluationVideoWriter:
    """Writes evaluated frames as three panels: the camera frame, its ground truth (class
    colours; grey where there is none) and the prediction blended over the frame.

    The panel size is the first frame's; later frames of another size are resized to it.

    Args:
        path: output ``.mp4`` file.
        class_colors: (K, 3) uint8 RGB colours.
        class_names: K names for the legend (default: the class ids).
        fps: frame rate of the video.
        alpha: weight of the class colours in the prediction's blend.
    """

    def __init__(self, path: str | Path, class_colors: np.ndarray, class_names: tuple[str, ...] | None = None,
                 fps: float = 10.0, alpha: float = 0.5) -> None:
        self.path = Path(path)
        self.fps = float(min(max(fps, 1.0), 120.0))
        self.alpha = alpha
        self._colors = np.asarray(class_colors, dtype=np.uint8)
        self._names = tuple(class_names) if class_names else tuple(str(i) for i in range(len(self._colors)))
        self._lut = color_lut(self._colors) if len(self._colors) <= 256 else None
        self._container = None
        self._stream = None
        self._panel: tuple[int, int] | None = None  # (height, width) of one panel
        self.frames_written = 0

    # -- drawing -------------------------------------------------------------------------

    def _text(self, image: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
        cv2.putText(image, text, origin, _FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(image, text, origin, _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)

    def _legend(self, width: int, classes: list[int], scale: float) -> np.ndarray:
        """A strip listing `classes` with their colours, wrapped over as many rows as needed."""
        row_height = max(int(22 * scale / 0.5), 16)
        entries = []
        for class_id in classes:
            label = self._names[class_id] if class_id < len(self._names) else str(class_id)
            text_width = cv2.getTextSize(label, _FONT, scale, 1)[0][0]
            entries.append((class_id, label, row_height + text_width + 16))
        rows, row, used = [], [], 0
        for entry in entries:
            if row and used + entry[2] > width:
                rows.append(row)
                row, used = [], 0
            row.append(entry)
            used += entry[2]
        rows.append(row)
        strip = np.full((row_height * max(len(rows), 1), width, 3), 32, np.uint8)
        for r, entries_in_row in enumerate(rows):
            x, y = 6, r * row_height
            for class_id, label, advance in entries_in_row:
                swatch = tuple(int(c) for c in self._colors[class_id])
                cv2.rectangle(strip, (x, y + 3), (x + row_height - 6, y + row_height - 3), swatch, -1)
                cv2.putText(strip, label, (x + row_height, y + row_height - 6), _FONT, scale,
                            (235, 235, 235), 1, cv2.LINE_AA)
                x += advance
        return strip

    def compose(self, frame_rgb: np.ndarray, labels: np.ndarray, truth: np.ndarray | None,
                caption: str = "") -> np.ndarray:
        """The video frame (RGB): panels side by side, caption on top, legend below."""
        if self._panel is None:
            self._panel = frame_rgb.shape[:2]
        height, width = self._panel

        def fit(image: np.ndarray, nearest: bool) -> np.ndarray:
            if image.shape[:2] == (height, width):
                return image
            method = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
            return cv2.resize(image, (width, height), interpolation=method)

        frame_rgb, labels = fit(frame_rgb, False), fit(labels, True)
        if truth is not None:
            truth = fit(truth, True)
            truth_panel = colorize(np.where(truth == IGNORE_LABEL, 0, truth), self._colors, self._lut)
            truth_panel[truth == IGNORE_LABEL] = 0
        else:
            truth_panel = np.full_like(frame_rgb, 96)
        prediction_panel = overlay(frame_rgb, colorize(labels, self._colors, self._lut), self.alpha)
        scale = max(0.4, height / 600.0)
        panels = np.concatenate([frame_rgb, truth_panel, prediction_panel], axis=1)
        for index, title in enumerate(("camera", "ground truth" if truth is not None else "no ground truth",
                                       "prediction")):
            self._text(panels, title, (index * width + 6, height - 8), scale)
        present = set(np.unique(labels).tolist())
        if truth is not None:
            present |= set(np.unique(truth[truth != IGNORE_LABEL]).tolist())
        legend = self._legend(panels.shape[1], sorted(c for c in present if c < len(self._colors)), scale)
        # Room for every class: the video keeps one size whatever a frame shows.
        room = self._legend(panels.shape[1], list(range(len(self._colors))), scale).shape[0]
        legend = np.concatenate([legend, np.full((room - legend.shape[0], legend.shape[1], 3), 32, np.uint8)])
        header = np.full((max(int(28 * scale / 0.5), 20), panels.shape[1], 3), 16, np.uint8)
        if caption:
            self._text(header, caption, (6, header.shape[0] - 7), scale * 1.1)
        image = np.concatenate([header, panels, legend], axis=0)
        # H.264 in yuv420p needs even sides.
        return np.ascontiguousarray(image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2])

    # -- writing -------------------------------------------------------------------------

    def add(self, frame_rgb: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None,
            caption: str = "") -> None:
        """Appends one frame: (H, W, 3) uint8 RGB, its (H, W) predicted labels and its
        ground truth (H, W, 255 = ignore) or None."""
        import av

        image = self.compose(frame_rgb, labels, truth, caption)
        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # +faststart puts the index first: browsers start playing before the end arrives.
            self._container = av.open(str(self.path), mode="w", options={"movflags": "+faststart"})
            self._stream = self._container.add_stream("libx264", rate=round(self.fps))
            self._stream.width, self._stream.height = image.shape[1], image.shape[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": "23", "preset": "veryfast"}
            self._size = (image.shape[1], image.shape[0])
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_NEAREST)
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> Path | None:
        """Finishes the file; returns its path, or None if no frame was written."""
        if self._container is None:
            return None
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return self.path


def video_caption(recorder, index: int, detail: str) -> str:
    """The caption of frame `index`: its detail (latency, snippet) and the running mIoU."""
    caption = f"frame {index}  {detail}"
    if recorder.scores.frames:
        caption += f"  running mIoU {100 * recorder.scores.mean_iou:.1f} %"
    return caption
