"""Writers for generated sequences: Cityscapes-style folders and rosbag2 (MCAP / sqlite3).

Cityscapes layout (every frame is labelled)::

    OUT/leftImg8bit_sequence/<split>/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png
    OUT/gtFine/<split>/<city>/<city>_<seq:06d>_<frame:06d>_gtFine_labelTrainIds.png
    OUT/gtFine/<split>/<city>/<city>_<seq:06d>_<frame:06d>_gtFine_labelIds.png

rosbag2 topics: ``/camera/image_raw`` (sensor_msgs/msg/Image, rgb8) and
``/camera/labels`` (sensor_msgs/msg/Image, mono8 train ids), same header stamp,
frame id ``camera``; the bag's receive time equals the header stamp.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from tdnet_ros.classes import train_id_to_label_id_table

IMAGE_TOPIC = "/camera/image_raw"
LABEL_TOPIC = "/camera/labels"
FRAME_ID = "camera"
STORAGES = ("mcap", "sqlite3")

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_LABEL_ID_LUT = np.array(train_id_to_label_id_table(), np.uint8)


class DatasetWriteError(RuntimeError):
    """A generated sequence cannot be written where or how it was asked."""


def check_folder_name(kind: str, value: str) -> None:
    """Raise DatasetWriteError unless ``value`` is a safe split or city name."""
    if not _NAME_PATTERN.match(value):
        raise DatasetWriteError(f"{kind} {value!r} must be letters, digits, '-' or '_'")


def cityscapes_stem(city: str, sequence: int, frame: int) -> str:
    """``<city>_<sequence:06d>_<frame:06d>``, the Cityscapes file name stem."""
    return f"{city}_{sequence:06d}_{frame:06d}"


def _check_frame(rgb: np.ndarray, labels: np.ndarray, index: int) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DatasetWriteError(f"frame {index}: image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if labels.dtype != np.uint8 or labels.shape != rgb.shape[:2]:
        raise DatasetWriteError(
            f"frame {index}: labels must be (H, W) uint8 matching the image {rgb.shape[:2]}, "
            f"got {labels.shape} {labels.dtype}"
        )


def write_cityscapes(
    frames: Iterable[tuple[np.ndarray, np.ndarray, int]],
    out_dir: str | Path,
    *,
    split: str = "train",
    city: str = "synth",
    sequence: int = 0,
    label_ids: bool = True,
) -> int:
    """Write frames in Cityscapes' ``leftImg8bit_sequence`` / ``gtFine`` layout.

    Args:
        frames: iterable of (rgb (H, W, 3) uint8, train ids (H, W) uint8, stamp_ns).
        out_dir: dataset root; created if missing.
        split: split folder name (``train``, ``val``, ...).
        city: city folder name and file prefix.
        sequence: sequence number in the file names (0..999999).
        label_ids: also write ``_gtFine_labelIds.png`` (Cityscapes label ids).

    Returns:
        Number of frames written.
    """
    check_folder_name("split", split)
    check_folder_name("city", city)
    if not 0 <= sequence <= 999_999:
        raise DatasetWriteError(f"sequence number {sequence} does not fit 6 digits")
    image_dir = Path(out_dir) / "leftImg8bit_sequence" / split / city
    label_dir = Path(out_dir) / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, (rgb, labels, _stamp) in enumerate(frames):
        _check_frame(rgb, labels, index)
        stem = cityscapes_stem(city, sequence, index)
        outputs = [
            (image_dir / f"{stem}_leftImg8bit.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)),
            (label_dir / f"{stem}_gtFine_labelTrainIds.png", labels),
        ]
        if label_ids:
            outputs.append((label_dir / f"{stem}_gtFine_labelIds.png", _LABEL_ID_LUT[labels]))
        for path, image in outputs:
            if not cv2.imwrite(str(path), image):
                raise DatasetWriteError(f"could not write {path}")
        count += 1
    return count


def write_rosbag(
    frames: Iterable[tuple[np.ndarray, np.ndarray, int]],
    bag_dir: str | Path,
    *,
    storage: str = "mcap",
    image_topic: str = IMAGE_TOPIC,
    label_topic: str = LABEL_TOPIC,
    frame_id: str = FRAME_ID,
) -> int:
    """Write frames to a new rosbag2 (camera image rgb8 + label image mono8, same stamps).

    Args:
        frames: iterable of (rgb (H, W, 3) uint8, train ids (H, W) uint8, stamp_ns).
        bag_dir: bag folder; must not exist yet (rosbag2 never overwrites).
        storage: ``"mcap"`` or ``"sqlite3"``.
        image_topic: topic of the camera images.
        label_topic: topic of the ground-truth train ids.
        frame_id: header frame id of both topics.

    Returns:
        Number of frames written.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
    if storage not in plugins:
        raise DatasetWriteError(f"unknown rosbag2 storage {storage!r}; choose one of {', '.join(STORAGES)}")
    bag_dir = Path(bag_dir)
    if bag_dir.exists():
        raise DatasetWriteError(f"{bag_dir} exists already; rosbag2 bags are never overwritten")
    bag_dir.parent.mkdir(parents=True, exist_ok=True)

    typestore = get_typestore(Stores.ROS2_KILTED)
    image_type = "sensor_msgs/msg/Image"
    image_cls = typestore.types[image_type]
    header_cls = typestore.types["std_msgs/msg/Header"]
    time_cls = typestore.types["builtin_interfaces/msg/Time"]

    def message(array: np.ndarray, encoding: str, stamp_ns: int) -> bytes:
        height, width = array.shape[:2]
        channels = 1 if array.ndim == 2 else array.shape[2]
        header = header_cls(stamp=time_cls(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000),
                            frame_id=frame_id)
        msg = image_cls(header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
                        step=width * channels, data=np.ascontiguousarray(array).reshape(-1))
        return bytes(typestore.serialize_cdr(msg, image_type))

    count = 0
    with Writer(bag_dir, version=9, storage_plugin=plugins[storage]) as writer:
        image_conn = writer.add_connection(image_topic, image_type, typestore=typestore)
        label_conn = writer.add_connection(label_topic, image_type, typestore=typestore)
        for index, (rgb, labels, stamp_ns) in enumerate(frames):
            _check_frame(rgb, labels, index)
            stamp_ns = int(stamp_ns)
            writer.write(image_conn, stamp_ns, message(rgb, "rgb8", stamp_ns))
            writer.write(label_conn, stamp_ns, message(labels, "mono8", stamp_ns))
            count += 1
    return count
