"""Ground truth for the evaluated frames: a label topic matched by stamp, or a PNG folder.

Both sources answer one question, :meth:`GroundTruth.lookup`: the label map for camera
frame ``index`` with header stamp ``stamp_ns``, or the reason there is none.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from tdnet_ros.evaluation.bag import DecodeFailure, Recording

IGNORE_LABEL = 255

# Cityscapes label ids (gtFine_labelIds.png) of the 19 evaluated classes, in train-id order
# (road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation,
# terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle). Every other id
# is not evaluated and maps to the ignore label.
CITYSCAPES_EVAL_LABEL_IDS = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33
)


def cityscapes_label_id_to_train_id_lut() -> np.ndarray:
    """(256,) uint8 lookup table from Cityscapes label ids to train ids (255: ignored)."""
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for train_id, label_id in enumerate(CITYSCAPES_EVAL_LABEL_IDS):
        lut[label_id] = train_id
    return lut


def cityscapes_train_id_to_label_id_lut() -> np.ndarray:
    """(256,) uint8 lookup table from train ids to Cityscapes label ids (others: 0, unlabeled)."""
    lut = np.zeros(256, dtype=np.uint8)
    for train_id, label_id in enumerate(CITYSCAPES_EVAL_LABEL_IDS):
        lut[train_id] = label_id
    return lut


@dataclass(frozen=True)
class LabelLookup:
    """The answer of a ground-truth source for one frame."""

    labels: np.ndarray | None  # (H, W) uint8 class ids, or None
    reason: str = ""  # why there is no label map ("" when there is none to expect)


class GroundTruth(Protocol):
    """A source of label maps for camera frames."""

    description: str

    def lookup(self, index: int, stamp_ns: int | None) -> LabelLookup: ...

    def problems(self) -> list[tuple[str, str]]:
        """(item, reason) for ground-truth entries that could not be used at all."""
        ...


@dataclass
class TopicGroundTruth:
    """Label maps from a topic of the recording, matched to camera frames by header stamp.

    The label topic is read once up front; each label map is kept PNG-compressed (label
    maps compress to a few percent), so long recordings fit in memory.

    Args:
        recording: the open recording.
        topic: the label topic (``sensor_msgs/Image``, mono8 class ids).
        tolerance_ns: a label matches a frame whose stamp is within this many nanoseconds
            (the nearest one wins).
    """

    recording: Recording
    topic: str
    tolerance_ns: int = 1_000_000
    description: str = field(init=False)
    _stamps: list[int] = field(init=False, default_factory=list)
    _encoded: dict[int, bytes] = field(init=False, default_factory=dict)
    _problems: list[tuple[str, str]] = field(init=False, default_factory=list)
    used: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.description = f"label topic {self.topic}"
        self.recording.check_topic(self.topic, "label", ("sensor_msgs/msg/Image",))
        for frame in self.recording.labels(self.topic):
            item = f"{self.topic} #{frame.index}"
            if isinstance(frame.data, DecodeFailure):
                self._problems.append((item, frame.data.reason))
                continue
            if frame.stamp_ns is None:
                self._problems.append((item, "label message has no readable header stamp"))
                continue
            if frame.stamp_ns in self._encoded:
                self._problems.append(
                    (item, f"duplicate label stamp {frame.stamp_ns} ns (first one kept)")
                )
                continue
            ok, png = cv2.imencode(".png", frame.data)
            if not ok:  # pragma: no cover - cv2 encodes any uint8 2-D array
                self._problems.append((item, "cannot store label map"))
                continue
            self._encoded[frame.stamp_ns] = png.tobytes()
        self._stamps = sorted(self._encoded)

    @property
    def count(self) -> int:
        return len(self._stamps)

    def lookup(self, index: int, stamp_ns: int | None) -> LabelLookup:
        if stamp_ns is None or not self._stamps:
            return LabelLookup(None)
        position = bisect.bisect_left(self._stamps, stamp_ns)
        candidates = self._stamps[max(0, position - 1): position + 1]
        nearest = min(candidates, key=lambda s: abs(s - stamp_ns))
        if abs(nearest - stamp_ns) > self.tolerance_ns:
            return LabelLookup(None)
        self.used.add(nearest)
        encoded = np.frombuffer(self._encoded[nearest], dtype=np.uint8)
        return LabelLookup(cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED))

    def problems(self) -> list[tuple[str, str]]:
        return list(self._problems)

    def unmatched(self) -> list[int]:
        """Stamps of label maps that matched no camera frame."""
        return [s for s in self._stamps if s not in self.used]


# <anything>_<number>[_gtFine]_labelTrainIds.png / _labelIds.png / <number>.png
_LABEL_FILE = re.compile(
    r"^(?P<prefix>.*?)(?P<number>\d+)(?:_gtFine)?(?:_(?P<kind>labelTrainIds|labelIds))?$"
)


@dataclass
class FolderGroundTruth:
    """Label PNGs in a folder (searched recursively), Cityscapes style.

    A file's key is the last number in its name before the ``_gtFine_label*`` suffix:
    ``frankfurt_000000_000294_gtFine_labelTrainIds.png`` has key 294, ``000012.png`` has
    key 12, ``1699999999123456789.png`` has that stamp. ``*_labelTrainIds.png`` and plain
    PNGs hold train ids (class ids, 255 ignored); ``*_labelIds.png`` hold Cityscapes label
    ids and are mapped to train ids. When a folder has both kinds for one key, train ids win.

    Args:
        folder: the folder.
        match: ``"index"``: key = position of the frame on the camera topic plus
            ``index_offset``; ``"stamp"``: key = header stamp in nanoseconds.
        index_offset: added to the frame index before matching (``"index"`` mode).
    """

    folder: Path
    match: str = "index"
    index_offset: int = 0
    description: str = field(init=False)
    _files: dict[int, Path] = field(init=False, default_factory=dict)
    _problems: list[tuple[str, str]] = field(init=False, default_factory=list)
    used: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        from tdnet_ros.evaluation.bag import BagError

        self.folder = Path(self.folder)
        if self.match not in ("index", "stamp"):
            raise ValueError(f"label match must be 'index' or 'stamp', got {self.match!r}")
        if not self.folder.is_dir():
            raise BagError(f"label folder {self.folder} does not exist or is not a folder")
        self.description = f"label folder {self.folder} (matched by {self.match})"
        kinds: dict[int, str] = {}
        for path in sorted(self.folder.rglob("*.png")):
            parsed = _LABEL_FILE.match(path.stem)
            if parsed is None:
                self._problems.append((str(path), "no frame number in the file name"))
                continue
            key = int(parsed["number"])
            kind = parsed["kind"] or "labelTrainIds"
            if key in self._files:
                if kinds[key] == kind:
                    self._problems.append(
                        (str(path), f"another label file has the same key {key}: "
                                    f"{self._files[key]}")
                    )
                    continue
                if kinds[key] == "labelTrainIds":  # train ids win over label ids
                    continue
            self._files[key] = path
            kinds[key] = kind
        self._kinds = kinds
        self._label_id_lut = cityscapes_label_id_to_train_id_lut()
        if not self._files:
            raise BagError(f"label folder {self.folder} has no label PNGs")

    @property
    def count(self) -> int:
        return len(self._files)

    def lookup(self, index: int, stamp_ns: int | None) -> LabelLookup:
        key = index + self.index_offset if self.match == "index" else stamp_ns
        if key is None or key not in self._files:
            return LabelLookup(None)
        path = self._files[key]
        self.used.add(key)
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if labels is None:
            return LabelLookup(None, f"cannot read label file {path}")
        if labels.ndim != 2:
            return LabelLookup(None, f"label file {path} has {labels.shape[2]} channels, "
                                     "expected a single-channel PNG of class ids")
        if labels.dtype != np.uint8:
            labels = np.where(labels < IGNORE_LABEL, labels, IGNORE_LABEL).astype(np.uint8)
        if self._kinds[key] == "labelIds":
            labels = self._label_id_lut[labels]
        return LabelLookup(labels)

    def problems(self) -> list[tuple[str, str]]:
        return list(self._problems)

    def unmatched(self) -> list[int]:
        return [k for k in sorted(self._files) if k not in self.used]
